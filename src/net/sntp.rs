//! An SNTPv4 client (RFC 4330) without I/O or clock: a request, the checks of a reply, the
//! offset and delay it measures, and what to do with the clock.
//!
//! The caller reads the wall clock when it sends (T1) and when the reply arrives (T4) and
//! passes both in; the server's receive (T2) and transmit (T3) timestamps come in the reply:
//!
//! - offset = ((T2 − T1) + (T3 − T4)) / 2: how far the server's clock is ahead of ours;
//! - delay = (T4 − T1) − (T3 − T2): the round trip, less the server's own time.
//!
//! Timestamps are NTP's 32.32 fixed point seconds since 1900. Differences are taken modulo
//! 2^64 and read as signed (RFC 4330 §3), so they hold across the 2036 era change as long as the
//! clocks are within 68 years of each other; no input panics.
//!
//! The clock policy ([`adjustment`]) is chrony's `makestep` in its simplest form: the first
//! sync after boot steps the clock, and so does any later offset beyond [`STEP_THRESHOLD`];
//! smaller later offsets are slewed (adjtime), so time never jumps under running services.

use std::time::Duration;

/// Seconds from 1900-01-01 (NTP era 0) to 1970-01-01 (Unix epoch).
pub const NTP_UNIX_OFFSET: u64 = 2_208_988_800;
pub const NTP_PORT: u16 = 123;
/// An NTP packet without extensions or MAC.
pub const PACKET_LEN: usize = 48;
/// Offsets beyond this are stepped even after the first sync.
pub const STEP_THRESHOLD: Duration = Duration::from_millis(500);
/// Random bits in the low end of the transmit timestamp's fraction (2^12 · 2^-32 s < 1 µs).
const NONCE_BITS: u32 = 12;

const MODE_CLIENT: u8 = 3;
const MODE_SERVER: u8 = 4;
const VERSION: u8 = 4;
/// Leap indicator 3: the server's clock is not synchronized.
const LEAP_ALARM: u8 = 3;

/// An NTP timestamp: seconds since 1900 in the high 32 bits, the fraction in the low 32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NtpTimestamp(pub u64);

impl NtpTimestamp {
    /// From wall time since the Unix epoch; past 2036 the seconds wrap into era 1, as on the wire.
    pub fn from_unix(since_epoch: Duration) -> Self {
        let secs = since_epoch.as_secs().wrapping_add(NTP_UNIX_OFFSET) & 0xffff_ffff;
        let frac = (u64::from(since_epoch.subsec_nanos()) << 32) / 1_000_000_000;
        NtpTimestamp((secs << 32) | frac)
    }

    /// To wall time since the Unix epoch, with RFC 4330 §3's era rule: a clear top bit of the
    /// seconds means era 1 (2036 to 2104). Times before 1970 read as the epoch.
    pub fn to_unix(self) -> Duration {
        let secs = self.0 >> 32;
        let secs = if secs & 0x8000_0000 != 0 {
            secs
        } else {
            secs + (1 << 32)
        };
        let nanos = ((self.0 & 0xffff_ffff) * 1_000_000_000) >> 32;
        Duration::new(secs.saturating_sub(NTP_UNIX_OFFSET), nanos as u32)
    }

    /// `self − earlier` in nanoseconds, era-safe within ±68 years.
    fn minus(self, earlier: NtpTimestamp) -> i128 {
        let fixed = i128::from(self.0.wrapping_sub(earlier.0) as i64);
        (fixed * 1_000_000_000) >> 32
    }
}

/// A request on its way: it remembers what it sent, to match and time the reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    transmit: NtpTimestamp,
}

impl Request {
    /// A request sent at `now` (wall time since the Unix epoch). The low bits of `nonce` replace
    /// the bottom of the timestamp (under a microsecond), so that a reply's origin timestamp
    /// cannot be guessed from the clock alone.
    pub fn new(now: Duration, nonce: u32) -> Self {
        let mask = (1u64 << NONCE_BITS) - 1;
        let t = NtpTimestamp::from_unix(now).0;
        Request {
            transmit: NtpTimestamp((t & !mask) | (u64::from(nonce) & mask)),
        }
    }

    /// T1, as sent.
    pub fn transmit(&self) -> NtpTimestamp {
        self.transmit
    }

    /// The datagram: LI 0, version 4, mode 3 (client), every field zero but the transmit
    /// timestamp (RFC 4330 §5).
    pub fn packet(&self) -> [u8; PACKET_LEN] {
        let mut p = [0u8; PACKET_LEN];
        p[0] = (VERSION << 3) | MODE_CLIENT;
        p[40..48].copy_from_slice(&self.transmit.0.to_be_bytes());
        p
    }
}

/// One measurement against one server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// How far the server's clock is ahead of ours (add it to ours).
    pub offset_ns: i64,
    /// The round trip without the server's processing time; never negative.
    pub delay_ns: i64,
    pub stratum: u8,
}

/// Why a reply was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("{0} bytes, an NTP reply has at least {PACKET_LEN}")]
    TooShort(usize),
    #[error("mode {0}, a server replies in mode 4")]
    NotServerMode(u8),
    #[error("NTP version {0} is not 1 to 4")]
    BadVersion(u8),
    /// Not an answer to our request: spoofed, or late for an earlier one.
    #[error("origin timestamp {got:#018x} is not our transmit timestamp {sent:#018x}")]
    OriginMismatch { sent: u64, got: u64 },
    /// Stratum 0: the server tells us to go away (RATE, DENY, ...).
    #[error("kiss-o'-death {0:?} from the server: ask another")]
    KissOfDeath(String),
    #[error("the server is not synchronized (leap indicator 3)")]
    Unsynchronized,
    #[error("stratum {0} is beyond 15: the server is not synchronized")]
    BadStratum(u8),
    #[error("the server's {0} timestamp is zero")]
    ZeroTimestamp(&'static str),
}

/// Check a reply to `request` that arrived at `received` (wall time since the Unix epoch) and
/// measure the offset and delay.
pub fn parse_reply(
    request: &Request,
    reply: &[u8],
    received: Duration,
) -> Result<Sample, ReplyError> {
    let p: &[u8; PACKET_LEN] = reply
        .get(..PACKET_LEN)
        .and_then(|p| p.try_into().ok())
        .ok_or(ReplyError::TooShort(reply.len()))?;
    let leap = p[0] >> 6;
    let version = (p[0] >> 3) & 7;
    let mode = p[0] & 7;
    let stratum = p[1];
    let ts = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&p[at..at + 8]);
        NtpTimestamp(u64::from_be_bytes(b))
    };
    let (origin, receive, transmit) = (ts(24), ts(32), ts(40));
    if mode != MODE_SERVER {
        return Err(ReplyError::NotServerMode(mode));
    }
    if !(1..=4).contains(&version) {
        return Err(ReplyError::BadVersion(version));
    }
    // first make sure it answers us: a spoofed kiss-o'-death must not count either
    if origin != request.transmit {
        return Err(ReplyError::OriginMismatch {
            sent: request.transmit.0,
            got: origin.0,
        });
    }
    if stratum == 0 {
        let code: String = p[12..16]
            .iter()
            .map(|&c| if c.is_ascii_graphic() { c as char } else { '?' })
            .collect();
        return Err(ReplyError::KissOfDeath(code));
    }
    if leap == LEAP_ALARM {
        return Err(ReplyError::Unsynchronized);
    }
    if stratum > 15 {
        return Err(ReplyError::BadStratum(stratum));
    }
    if transmit.0 == 0 {
        return Err(ReplyError::ZeroTimestamp("transmit"));
    }
    if receive.0 == 0 {
        return Err(ReplyError::ZeroTimestamp("receive"));
    }
    let t1 = request.transmit;
    let t4 = NtpTimestamp::from_unix(received);
    let offset = (receive.minus(t1) + transmit.minus(t4)) / 2;
    let delay = t4.minus(t1) - transmit.minus(receive);
    let clamp = |v: i128| v.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64;
    Ok(Sample {
        offset_ns: clamp(offset),
        // clock granularity can make a loopback round trip look a little negative
        delay_ns: clamp(delay).max(0),
        stratum,
    })
}

/// Of several servers' samples, the one with the smallest delay (the least path asymmetry can
/// hide in it).
pub fn best(samples: impl IntoIterator<Item = Sample>) -> Option<Sample> {
    samples.into_iter().min_by_key(|s| s.delay_ns)
}

/// What to do with the system clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockAdjustment {
    /// Set the clock to now + this many nanoseconds (clock_settime).
    Step { offset_ns: i64 },
    /// Let the kernel run the clock slightly faster or slower until it has gained this many
    /// nanoseconds (adjtime; Linux slews at 0.5 ms/s).
    Slew { offset_ns: i64 },
}

/// The first sync after boot steps (the clock may be anywhere: no RTC, a stale RTC); later an
/// offset beyond [`STEP_THRESHOLD`] steps and a smaller one slews.
pub fn adjustment(offset_ns: i64, first_sync: bool) -> ClockAdjustment {
    if first_sync || u128::from(offset_ns.unsigned_abs()) > STEP_THRESHOLD.as_nanos() {
        ClockAdjustment::Step { offset_ns }
    } else {
        ClockAdjustment::Slew { offset_ns }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NS: i64 = 1_000_000_000;

    fn unix(secs: u64, nanos: u32) -> Duration {
        Duration::new(secs, nanos)
    }

    /// A server's reply: `receive` (T2) and `transmit` (T3) as wall times.
    fn server_reply(req: &Request, stratum: u8, receive: Duration, transmit: Duration) -> [u8; 48] {
        let mut p = [0u8; 48];
        p[0] = (VERSION << 3) | MODE_SERVER;
        p[1] = stratum;
        p[12..16].copy_from_slice(b"LOCL");
        p[24..32].copy_from_slice(&req.transmit().0.to_be_bytes());
        p[32..40].copy_from_slice(&NtpTimestamp::from_unix(receive).0.to_be_bytes());
        p[40..48].copy_from_slice(&NtpTimestamp::from_unix(transmit).0.to_be_bytes());
        p
    }

    #[test]
    fn request_is_a_version_4_client_packet_with_our_time() {
        let t = unix(1_700_000_000, 250_000_000);
        let r = Request::new(t, 0xfff);
        let p = r.packet();
        assert_eq!(p[0], 0b00_100_011);
        assert!(p[1..40].iter().all(|b| *b == 0));
        assert_eq!(
            u64::from_be_bytes(p[40..48].try_into().unwrap()),
            r.transmit().0
        );
        let back = r.transmit().to_unix();
        assert!(
            back.abs_diff(t) < Duration::from_micros(1),
            "{back:?} vs {t:?}"
        );
        // the nonce changes only the bits under a microsecond
        assert_ne!(Request::new(t, 1).transmit(), Request::new(t, 2).transmit());
    }

    #[test]
    fn offset_and_delay_from_known_timestamps() {
        // T1 = 100 s, T2 = 110.5 s, T3 = 110.6 s, T4 = 101 s: the server is 10.05 s ahead and
        // the path took 0.9 s
        let r = Request::new(unix(1_700_000_100, 0), 0);
        let p = server_reply(
            &r,
            2,
            unix(1_700_000_110, 500_000_000),
            unix(1_700_000_110, 600_000_000),
        );
        let s = parse_reply(&r, &p, unix(1_700_000_101, 0)).unwrap();
        assert!((s.offset_ns - (10 * NS + 50_000_000)).abs() < 10, "{s:?}");
        assert!((s.delay_ns - 900_000_000).abs() < 10, "{s:?}");
        assert_eq!(s.stratum, 2);
        // a server behind us: negative offset
        let p = server_reply(&r, 2, unix(1_700_000_000, 0), unix(1_700_000_000, 0));
        let s = parse_reply(&r, &p, unix(1_700_000_100, 0)).unwrap();
        assert!((s.offset_ns + 100 * NS).abs() < 10, "{s:?}");
    }

    #[test]
    fn across_the_2036_era_change() {
        // 2036-02-07 06:28:16 UTC is NTP second 2^32: era 1 starts
        let era1 = (1u64 << 32) - NTP_UNIX_OFFSET;
        let r = Request::new(unix(era1 - 1, 0), 0);
        let p = server_reply(&r, 1, unix(era1 + 1, 0), unix(era1 + 1, 0));
        let s = parse_reply(&r, &p, unix(era1 - 1, 0)).unwrap();
        assert!((s.offset_ns - 2 * NS).abs() < 10, "{s:?}");
        assert_eq!(
            NtpTimestamp::from_unix(unix(era1 + 5, 0)).to_unix(),
            unix(era1 + 5, 0)
        );
        assert_eq!(NtpTimestamp(0).to_unix(), unix(era1, 0));
    }

    #[test]
    fn spoofed_and_refused_replies() {
        let t = unix(1_700_000_000, 0);
        let r = Request::new(t, 5);
        let good = server_reply(&r, 8, t, t);
        assert!(parse_reply(&r, &good, t).is_ok());

        let mut spoofed = good;
        spoofed[31] ^= 1;
        assert!(matches!(
            parse_reply(&r, &spoofed, t),
            Err(ReplyError::OriginMismatch { .. })
        ));
        // a reply to another request of ours (the nonce differs)
        let other = Request::new(t, 6);
        assert!(matches!(
            parse_reply(&other, &good, t),
            Err(ReplyError::OriginMismatch { .. })
        ));

        let mut kod = server_reply(&r, 0, t, t);
        kod[12..16].copy_from_slice(b"RATE");
        assert_eq!(
            parse_reply(&r, &kod, t),
            Err(ReplyError::KissOfDeath("RATE".into()))
        );
        // a spoofed kiss-o'-death is only a mismatch
        kod[30] ^= 1;
        assert!(matches!(
            parse_reply(&r, &kod, t),
            Err(ReplyError::OriginMismatch { .. })
        ));

        let mut alarm = good;
        alarm[0] |= 3 << 6;
        assert_eq!(parse_reply(&r, &alarm, t), Err(ReplyError::Unsynchronized));
        let mut s16 = good;
        s16[1] = 16;
        assert_eq!(parse_reply(&r, &s16, t), Err(ReplyError::BadStratum(16)));
        let mut client_mode = good;
        client_mode[0] = (VERSION << 3) | MODE_CLIENT;
        assert_eq!(
            parse_reply(&r, &client_mode, t),
            Err(ReplyError::NotServerMode(3))
        );
        let mut v0 = good;
        v0[0] = MODE_SERVER;
        assert_eq!(parse_reply(&r, &v0, t), Err(ReplyError::BadVersion(0)));
        let mut zero_tx = good;
        zero_tx[40..48].fill(0);
        assert_eq!(
            parse_reply(&r, &zero_tx, t),
            Err(ReplyError::ZeroTimestamp("transmit"))
        );
        assert_eq!(
            parse_reply(&r, &good[..47], t),
            Err(ReplyError::TooShort(47))
        );
    }

    #[test]
    fn smallest_delay_wins() {
        let s = |offset_ns, delay_ns| Sample {
            offset_ns,
            delay_ns,
            stratum: 2,
        };
        assert_eq!(best([s(5, 300), s(7, 100), s(9, 200)]), Some(s(7, 100)));
        assert_eq!(best([]), None);
    }

    #[test]
    fn step_first_then_slew_small_offsets() {
        use ClockAdjustment::*;
        let half = 500_000_000;
        assert_eq!(adjustment(1_000, true), Step { offset_ns: 1_000 });
        assert_eq!(adjustment(-3 * NS, true), Step { offset_ns: -3 * NS });
        assert_eq!(adjustment(half, false), Slew { offset_ns: half });
        assert_eq!(adjustment(-half, false), Slew { offset_ns: -half });
        assert_eq!(
            adjustment(half + 1, false),
            Step {
                offset_ns: half + 1
            }
        );
        assert_eq!(
            adjustment(-half - 1, false),
            Step {
                offset_ns: -half - 1
            }
        );
        assert_eq!(
            adjustment(i64::MIN, false),
            Step {
                offset_ns: i64::MIN
            }
        );
    }

    proptest! {
        /// Any reply bytes and any timestamps: refused or measured, never a panic.
        #[test]
        fn any_input_is_handled(
            bytes in prop::collection::vec(any::<u8>(), 0..64),
            sent in any::<u64>(),
            received in any::<u64>(),
            nonce in any::<u32>(),
            echo in any::<bool>(),
        ) {
            let r = Request::new(Duration::from_nanos(sent), nonce);
            let mut bytes = bytes;
            if echo && bytes.len() >= 32 {
                bytes[24..32].copy_from_slice(&r.transmit().0.to_be_bytes());
            }
            if let Ok(s) = parse_reply(&r, &bytes, Duration::from_nanos(received)) {
                prop_assert!(s.delay_ns >= 0);
                prop_assert!((1..=15).contains(&s.stratum));
            }
            let _ = NtpTimestamp(sent).to_unix();
            let _ = NtpTimestamp::from_unix(Duration::new(received, nonce % 1_000_000_000));
        }
    }
}
