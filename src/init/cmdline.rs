//! Parsing what keel-init is told at start: the kernel command line (`keel.*` parameters) and
//! its own arguments. Pure: text in, values and warnings out. Bad values never stop a boot; they
//! are reported and the default is used.

use crate::bootctl::Slot;
use crate::config::Ipv4Cidr;
use std::net::Ipv4Addr;
use std::path::PathBuf;

/// The `keel.*` parameters of the kernel command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelParams {
    /// `keel.ip=10.0.2.15/24`
    pub ip: Option<Ipv4Cidr>,
    /// `keel.gw=10.0.2.2`
    pub gateway: Option<Ipv4Addr>,
    /// `keel.iface=eth0`
    pub iface: Option<String>,
    /// `keel.watchdog=60` (seconds; 0 disables the watchdog in stage 1)
    pub watchdog_secs: Option<u32>,
    /// `keel.disk_wait=30`: how long stage 1 waits for the boot disk to appear (seconds).
    pub disk_wait_secs: Option<u64>,
    /// `keel.modules=/lib/modules/keel-modules.list`
    pub modules: Option<PathBuf>,
    /// `keel.stage=1|2`: force a stage.
    pub stage: Option<u8>,
    /// `keel.disk=/dev/vdb`: boot from this disk instead of scanning for the KeelOS labels.
    pub disk: Option<PathBuf>,
    /// `keel.slot=a|b`: set by the boot stage on the slot kernel's command line. Its presence
    /// makes stage 1 the slot's own: it mounts this slot and spends no try.
    pub slot: Option<Slot>,
    /// `keel.boot=trial|good`: whether the boot stage spent one of the slot's tries.
    pub trial: Option<bool>,
    /// `keel.bootstage=1.0.0`: the boot stage's version.
    pub boot_stage: Option<String>,
    /// `keel.refused=b:kernel-load-failed,...`: slots the boot stage refused in this power-on.
    pub refused: Option<String>,
    /// `keel.fallback=b`: the boot choice fell back from this slot (its tries ran out).
    pub fallback_from: Option<Slot>,
    /// `keel.demoted=a`: the boot choice demoted this successful slot (its last boots did not
    /// reach health).
    pub demoted: Option<Slot>,
    /// `keel.verity=HEX`: the root hash the boot stage mapped this slot with (from the slot's
    /// record); the slot's own stage 1 maps the root with the same one.
    pub verity: Option<String>,
}

/// Split a command line the way the kernel does: whitespace separates, double quotes group.
/// Everything after a lone `--` belongs to init's argv and is not a kernel parameter.
pub fn split(cmdline: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(cur);
    }
    if let Some(i) = out.iter().position(|w| w == "--") {
        out.truncate(i);
    }
    out
}

/// Parse the `keel.*` parameters; other parameters are ignored. Returns the values and a
/// warning for each value that could not be used.
pub fn parse_kernel(cmdline: &str) -> (KernelParams, Vec<String>) {
    let mut p = KernelParams::default();
    let mut warn = Vec::new();
    for word in split(cmdline) {
        let Some((key, value)) = word.split_once('=') else {
            continue;
        };
        let bad = |what: &str| format!("kernel parameter {key}={value:?}: {what}; ignored");
        match key {
            "keel.ip" => match value.parse::<Ipv4Cidr>() {
                Ok(c) => p.ip = Some(c),
                Err(e) => warn.push(bad(&e)),
            },
            "keel.gw" => match value.parse() {
                Ok(g) => p.gateway = Some(g),
                Err(_) => warn.push(bad("not an IPv4 address")),
            },
            "keel.iface" => {
                if value.is_empty() || value.len() > 15 || value.contains('/') {
                    warn.push(bad("not an interface name"));
                } else {
                    p.iface = Some(value.to_string());
                }
            }
            "keel.watchdog" => match value.parse::<u32>() {
                Ok(s) if s <= 3600 => p.watchdog_secs = Some(s),
                _ => warn.push(bad("expected seconds from 0 to 3600")),
            },
            "keel.disk_wait" => match value.parse::<u64>() {
                Ok(s) if s <= 3600 => p.disk_wait_secs = Some(s),
                _ => warn.push(bad("expected seconds from 0 to 3600")),
            },
            "keel.modules" => {
                if value.starts_with('/') {
                    p.modules = Some(PathBuf::from(value));
                } else {
                    warn.push(bad("expected an absolute path"));
                }
            }
            "keel.disk" => {
                if value.starts_with('/') {
                    p.disk = Some(PathBuf::from(value));
                } else {
                    warn.push(bad("expected an absolute path"));
                }
            }
            "keel.stage" => match value {
                "1" => p.stage = Some(1),
                "2" => p.stage = Some(2),
                _ => warn.push(bad("expected 1 or 2")),
            },
            "keel.slot" => match value.parse() {
                Ok(slot) => p.slot = Some(slot),
                Err(_) => warn.push(bad("expected a or b")),
            },
            "keel.boot" => match value {
                "trial" => p.trial = Some(true),
                "good" => p.trial = Some(false),
                _ => warn.push(bad("expected trial or good")),
            },
            "keel.bootstage" => p.boot_stage = Some(value.to_string()),
            "keel.refused" => p.refused = Some(value.to_string()),
            "keel.fallback" => match value.parse() {
                Ok(slot) => p.fallback_from = Some(slot),
                Err(_) => warn.push(bad("expected a or b")),
            },
            "keel.demoted" => match value.parse() {
                Ok(slot) => p.demoted = Some(slot),
                Err(_) => warn.push(bad("expected a or b")),
            },
            "keel.verity" => match crate::update::record::parse_digest(value) {
                Some(d) => p.verity = Some(crate::update::record::hex(&d)),
                None => warn.push(bad("expected a 64-hex-digit root hash")),
            },
            k if k.starts_with("keel.") => warn.push(bad("unknown keel parameter")),
            _ => {}
        }
    }
    (p, warn)
}

/// The parameters for module `module` on the command line (`module.param=value` words, as the
/// kernel and modprobe take them; `-` and `_` are the same in module names), joined with
/// spaces as finit_module(2) takes them.
pub fn module_params(cmdline: &str, module: &str) -> String {
    let norm = |s: &str| s.replace('-', "_");
    let module = norm(module);
    split(cmdline)
        .into_iter()
        .filter_map(|w| {
            let (key, _) = w.split_once('=')?;
            let (m, param) = key.split_once('.')?;
            (norm(m) == module && !param.is_empty()).then_some(w)
        })
        .map(|w| {
            w.split_once('.')
                .map(|(_, rest)| rest.to_string())
                .unwrap_or(w)
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// keel-init's own arguments.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InitArgs {
    /// `--stage 1|2`
    pub stage: Option<u8>,
    /// `--config PATH` (default /state/config/node.json)
    pub config: Option<PathBuf>,
    /// `--state-dir PATH` (default /state)
    pub state_dir: Option<PathBuf>,
    /// `--control PATH` (default /run/keel/init.sock)
    pub control: Option<PathBuf>,
    /// `--boot-disk PATH`: the disk stage 1 booted from.
    pub boot_disk: Option<PathBuf>,
    /// `--slot a|b`: the slot stage 1 mounted.
    pub slot: Option<Slot>,
    /// `--watchdog-fd N`: the watchdog stage 1 armed, kept open across exec.
    pub watchdog_fd: Option<i32>,
    /// `--cmdline PATH`: read the kernel parameters from here (default /proc/cmdline)
    pub cmdline: Option<PathBuf>,
    /// `--handoff WORDS`: the boot stage's hand-over words (`keel.slot=b keel.boot=trial ...`)
    /// when it switched root into a slot without a kernel, so there was no command line to
    /// carry them.
    pub handoff: Option<String>,
}

/// Parse keel-init's arguments (without argv[0]). Unknown words are returned, not fatal: the
/// kernel passes init any command-line word it does not know.
pub fn parse_args(args: &[String]) -> (InitArgs, Vec<String>) {
    let mut a = InitArgs::default();
    let mut unknown = Vec::new();
    let mut it = args.iter();
    while let Some(w) = it.next() {
        let (key, inline) = match w.split_once('=') {
            Some((k, v)) if k.starts_with("--") => (k, Some(v.to_string())),
            _ => (w.as_str(), None),
        };
        let takes_value = matches!(
            key,
            "--stage"
                | "--config"
                | "--state-dir"
                | "--control"
                | "--boot-disk"
                | "--slot"
                | "--watchdog-fd"
                | "--cmdline"
                | "--handoff"
        );
        if !takes_value {
            unknown.push(w.clone());
            continue;
        }
        let Some(v) = inline.or_else(|| it.next().cloned()) else {
            unknown.push(format!("{key} needs a value"));
            continue;
        };
        let mut bad = || unknown.push(format!("{key} {v:?}: not a valid value"));
        match key {
            "--stage" => match v.as_str() {
                "1" => a.stage = Some(1),
                "2" => a.stage = Some(2),
                _ => bad(),
            },
            "--config" => a.config = Some(v.into()),
            "--state-dir" => a.state_dir = Some(v.into()),
            "--control" => a.control = Some(v.into()),
            "--boot-disk" => a.boot_disk = Some(v.into()),
            "--cmdline" => a.cmdline = Some(v.into()),
            "--handoff" => a.handoff = Some(v),
            "--slot" => match v.parse() {
                Ok(s) => a.slot = Some(s),
                Err(_) => bad(),
            },
            "--watchdog-fd" => match v.parse::<i32>() {
                Ok(fd) if fd >= 0 => a.watchdog_fd = Some(fd),
                _ => bad(),
            },
            _ => unknown.push(w.clone()),
        }
    }
    (a, unknown)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_parameters() {
        let line = "console=ttyS0 quiet keel.ip=10.0.2.15/24 keel.gw=10.0.2.2 \
                    keel.iface=\"eth0\" keel.watchdog=30 keel.disk_wait=abc keel.bogus=1 \
                    keel.modules=/lib/modules/keel-modules.list keel.disk=/dev/vdb \
                    -- keel.stage=2\n";
        let (p, warn) = parse_kernel(line);
        assert_eq!(p.ip, Some("10.0.2.15/24".parse().unwrap()));
        assert_eq!(p.gateway, Some(Ipv4Addr::new(10, 0, 2, 2)));
        assert_eq!(p.iface.as_deref(), Some("eth0"));
        assert_eq!(p.watchdog_secs, Some(30));
        assert_eq!(p.disk_wait_secs, None);
        assert_eq!(
            p.modules.as_deref(),
            Some(std::path::Path::new("/lib/modules/keel-modules.list"))
        );
        assert_eq!(p.disk.as_deref(), Some(std::path::Path::new("/dev/vdb")));
        // after `--` the words are init's, not the kernel's
        assert_eq!(p.stage, None);
        assert_eq!(warn.len(), 2, "{warn:?}");
        assert!(
            warn[0].starts_with("kernel parameter keel.disk_wait=\"abc\""),
            "{warn:?}"
        );
        assert!(warn[1].contains("unknown keel parameter"), "{warn:?}");
    }

    #[test]
    fn the_boot_stage_handoff_words() {
        let (p, warn) = parse_kernel(
            "keel.slot=b keel.boot=trial keel.bootstage=1.0.0 \
             keel.refused=a:kernel-load-failed keel.fallback=a",
        );
        assert!(warn.is_empty(), "{warn:?}");
        assert_eq!(p.slot, Some(Slot::B));
        assert_eq!(p.trial, Some(true));
        assert_eq!(p.boot_stage.as_deref(), Some("1.0.0"));
        assert_eq!(p.refused.as_deref(), Some("a:kernel-load-failed"));
        assert_eq!(p.fallback_from, Some(Slot::A));
        let (p, warn) = parse_kernel("keel.slot=c keel.boot=maybe keel.fallback=");
        assert_eq!((p.slot, p.trial, p.fallback_from), (None, None, None));
        assert_eq!(warn.len(), 3, "{warn:?}");
    }

    #[test]
    fn module_parameters_come_from_the_command_line() {
        let line = "console=ttyS0 i6300esb.nowayout=1 i6300esb.heartbeat=20 \
                    virtio-blk.foo=1 watchdog.stop_on_reboot=0 i6300esb=1 .x=1";
        assert_eq!(module_params(line, "i6300esb"), "nowayout=1 heartbeat=20");
        assert_eq!(module_params(line, "virtio_blk"), "foo=1");
        assert_eq!(module_params(line, "watchdog"), "stop_on_reboot=0");
        assert_eq!(module_params(line, "ext4"), "");
    }

    #[test]
    fn quotes_group_words() {
        assert_eq!(split(r#"a="b c" d  "" e"#), ["a=b c", "d", "", "e"]);
        let (p, w) = parse_kernel("keel.ip=10.0.2.15");
        assert_eq!(p.ip, None);
        assert!(w[0].contains("no prefix length"), "{w:?}");
    }

    #[test]
    fn init_arguments() {
        let v: Vec<String> = [
            "--stage",
            "2",
            "--slot=b",
            "--boot-disk",
            "/dev/vda",
            "--watchdog-fd",
            "3",
            "single",
            "--slot",
            "c",
            "--config",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (a, unknown) = parse_args(&v);
        assert_eq!(a.stage, Some(2));
        assert_eq!(a.slot, Some(Slot::B));
        assert_eq!(a.boot_disk, Some(PathBuf::from("/dev/vda")));
        assert_eq!(a.watchdog_fd, Some(3));
        assert_eq!(
            unknown,
            [
                "single",
                "--slot \"c\": not a valid value",
                "--config needs a value"
            ]
        );
    }
}
