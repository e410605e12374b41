//! The mounts of stage 1: kernel file systems, the writable places on STATE, and the switch to
//! the new root. Every function here changes the mount table of the calling process; none is
//! called by stage 2 except [`unmount_state`].

use super::log;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// A mount failed.
#[derive(Debug, thiserror::Error)]
#[error("mounting {what} ({fstype}) on {target} failed: {source}")]
pub struct MountError {
    pub what: String,
    pub fstype: String,
    pub target: String,
    #[source]
    pub source: nix::Error,
}

/// Mount `what` on `target` (created if missing). An already mounted target (EBUSY) is fine.
pub fn mount_fs(
    what: &str,
    target: &Path,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), MountError> {
    let _ = std::fs::create_dir_all(target);
    match mount(Some(what), target, Some(fstype), flags, data) {
        Ok(()) | Err(nix::Error::EBUSY) => Ok(()),
        Err(source) => Err(MountError {
            what: what.to_string(),
            fstype: fstype.to_string(),
            target: target.display().to_string(),
            source,
        }),
    }
}

/// The kernel file systems every later step and service needs, in mount order.
pub const EARLY: &[(&str, &str, &str, &str)] = &[
    // (source, target, type, data)
    ("proc", "/proc", "proc", ""),
    ("sysfs", "/sys", "sysfs", ""),
    // the lockdown mode (and other LSM state) for the agent's Status
    ("securityfs", "/sys/kernel/security", "securityfs", ""),
    ("devtmpfs", "/dev", "devtmpfs", "mode=0755"),
    ("tmpfs", "/run", "tmpfs", "mode=0755"),
    (
        "devpts",
        "/dev/pts",
        "devpts",
        "gid=5,mode=620,ptmxmode=666",
    ),
    ("tmpfs", "/dev/shm", "tmpfs", "mode=1777"),
    ("cgroup2", "/sys/fs/cgroup", "cgroup2", "nsdelegate"),
];

/// Mount [`EARLY`]. Failures are logged and skipped: the boot goes on as far as it can, and
/// the log says why a later step fails.
pub fn mount_early() {
    let base = MsFlags::MS_NOSUID;
    for (src, target, fstype, data) in EARLY {
        let mut flags = base;
        if *fstype != "devtmpfs" && *fstype != "devpts" {
            flags |= MsFlags::MS_NODEV;
        }
        if matches!(*fstype, "proc" | "sysfs" | "securityfs" | "cgroup2") {
            flags |= MsFlags::MS_NOEXEC;
        }
        let data = (!data.is_empty()).then_some(*data);
        if let Err(e) = mount_fs(src, Path::new(target), fstype, flags, data) {
            log(e);
        }
    }
}

/// Whether `path` is a mount point: it is on another device than its parent (or is `/`).
pub fn is_mount_point(path: &Path) -> bool {
    let Ok(m) = std::fs::metadata(path) else {
        return false;
    };
    let parent = path.parent().unwrap_or(Path::new("/"));
    match std::fs::metadata(parent) {
        Ok(p) => p.dev() != m.dev() || p.ino() == m.ino(),
        Err(_) => false,
    }
}

/// Under the new root, with STATE mounted at `<root>/state`: create the STATE directories,
/// bind `/var` to `/state/var`, overlay `/etc` with `/state/overlay/etc` so that what services
/// write there persists over the image's defaults, and a tmpfs on `/tmp`.
pub fn prepare_state(root: &Path) {
    let state = root.join("state");
    for d in [
        "config",
        "pki",
        "update",
        "log",
        "var",
        "overlay/etc/upper",
        "overlay/etc/work",
    ] {
        if let Err(e) = std::fs::create_dir_all(state.join(d)) {
            log(format!("cannot create {}: {e}", state.join(d).display()));
        }
    }
    let _ = std::fs::set_permissions(
        state.join("pki"),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    );
    let var = root.join("var");
    if let Err(e) = mount(
        Some(&state.join("var")),
        &var,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    ) {
        log(format!(
            "cannot bind {} on {}: {e}; /var stays read-only",
            state.join("var").display(),
            var.display()
        ));
    }
    let etc = root.join("etc");
    if etc.is_dir() {
        let data = format!(
            "lowerdir={},upperdir={},workdir={}",
            etc.display(),
            state.join("overlay/etc/upper").display(),
            state.join("overlay/etc/work").display()
        );
        if let Err(e) = mount_fs("overlay", &etc, "overlay", MsFlags::empty(), Some(&data)) {
            log(format!("{e}; /etc stays read-only"));
        }
    }
    let tmp = root.join("tmp");
    if tmp.is_dir() {
        if let Err(e) = mount_fs(
            "tmpfs",
            &tmp,
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        ) {
            log(e);
        }
    }
}

/// Move the kernel file systems into `root`, make it `/` and chroot into it (what
/// switch_root(8) does). The initramfs stays in memory: its files are not deleted.
pub fn switch_root(root: &Path) -> Result<(), MountError> {
    for fs in ["/dev", "/proc", "/sys", "/run"] {
        let target = root.join(fs.trim_start_matches('/'));
        let _ = std::fs::create_dir_all(&target);
        if let Err(source) = mount(
            Some(fs),
            &target,
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        ) {
            // the new root may lack the directory; the later mounts would fail loudly anyway
            log(format!(
                "cannot move {fs} into {}: {source}",
                root.display()
            ));
        }
    }
    let err = |what: &str, source| MountError {
        what: what.to_string(),
        fstype: "move".to_string(),
        target: "/".to_string(),
        source,
    };
    nix::unistd::chdir(root).map_err(|e| err("chdir", e))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| err(&root.display().to_string(), e))?;
    nix::unistd::chroot(".").map_err(|e| err("chroot", e))?;
    nix::unistd::chdir("/").map_err(|e| err("chdir /", e))?;
    Ok(())
}

/// The mount points to take down at shutdown, from `/proc/self/mountinfo`'s text: every one at
/// or under one of `tops`, the most recently mounted first (mountinfo lists mounts in the order
/// they were made), so a mount comes off before the one it was made on or from. Mount points are
/// decoded from mountinfo's octal escapes (`\040` for a space).
pub fn unmount_order(mountinfo: &str, tops: &[&Path]) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .filter(|p| tops.iter().any(|t| p.starts_with(t)))
        .collect();
    out.reverse();
    // a path mounted over several times is unmounted as many times, once per line
    out
}

fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                let v = d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0'));
                out.push(u8::try_from(v).unwrap_or(b'?'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Unmount STATE at shutdown (after the services are gone): every mount made on it or from it
/// first (the /var bind, the /etc overlay, and what containerd and kubelet mounted under /var
/// and /run: container root overlays use layers on STATE), then STATE itself. Failures are
/// logged: sync has already run; STATE is remounted read-only when it stays busy.
pub fn unmount_state(state: &Path) {
    let tops = [
        Path::new("/etc"),
        Path::new("/var"),
        Path::new("/run/"),
        state,
    ];
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for p in unmount_order(&info, &tops) {
        // /run itself (a tmpfs) and STATE stay for below
        if p == Path::new("/run") || p == state {
            continue;
        }
        if let Err(e) = umount2(&p, MntFlags::empty()) {
            log(format!("cannot unmount {}: {e}", p.display()));
        }
    }
    if !is_mount_point(state) {
        return;
    }
    if let Err(e) = umount2(state, MntFlags::empty()) {
        log(format!(
            "cannot unmount {}: {e}; remounting it read-only",
            state.display()
        ));
        if let Err(e) = mount(
            None::<&str>,
            state,
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        ) {
            log(format!("cannot remount {} read-only: {e}", state.display()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points() {
        assert!(is_mount_point(Path::new("/")));
        assert!(is_mount_point(Path::new("/proc")));
        assert!(!is_mount_point(Path::new("/proc/self")));
        assert!(!is_mount_point(Path::new("/nonexistent")));
    }

    #[test]
    fn early_mounts_include_what_containerd_and_kubelet_need() {
        let targets: Vec<_> = EARLY.iter().map(|m| m.1).collect();
        for t in [
            "/proc",
            "/sys",
            "/dev",
            "/run",
            "/dev/pts",
            "/dev/shm",
            "/sys/fs/cgroup",
        ] {
            assert!(targets.contains(&t), "{t}");
        }
        // parents before children
        for (i, t) in targets.iter().enumerate() {
            for later in &targets[i + 1..] {
                assert!(!t.starts_with(later), "{later} must come before {t}");
            }
        }
    }

    #[test]
    fn shutdown_unmounts_what_was_mounted_on_state_newest_first() {
        let info = "\
22 1 253:0 / / ro,relatime - squashfs /dev/mapper/keel-root-a ro
23 22 0:5 / /dev rw - devtmpfs devtmpfs rw
24 22 0:21 / /run rw - tmpfs tmpfs rw
25 22 252:4 / /state rw - ext4 /dev/vda4 rw
26 22 252:4 /var /var rw - ext4 /dev/vda4 rw
27 22 0:30 / /etc rw - overlay overlay rw,lowerdir=/etc
28 22 0:31 / /tmp rw - tmpfs tmpfs rw
40 26 252:4 /var/lib/kubelet /var/lib/kubelet rw shared:5 - ext4 /dev/vda4 rw
41 24 0:4 net:[4026532] /run/netns/cni-1 rw - nsfs nsfs rw
42 24 0:50 / /run/containerd/io.containerd.runtime.v2.task/k8s.io/ab/rootfs rw - overlay overlay rw
43 40 0:51 / /var/lib/kubelet/pods/x/volumes/kubernetes.io~empty\\040dir/a rw - tmpfs tmpfs rw
";
        let order = unmount_order(
            info,
            &[
                Path::new("/etc"),
                Path::new("/var"),
                Path::new("/run/"),
                Path::new("/state"),
            ],
        );
        let order: Vec<_> = order.iter().map(|p| p.to_str().unwrap()).collect();
        assert_eq!(
            order,
            [
                "/var/lib/kubelet/pods/x/volumes/kubernetes.io~empty dir/a",
                "/run/containerd/io.containerd.runtime.v2.task/k8s.io/ab/rootfs",
                "/run/netns/cni-1",
                "/var/lib/kubelet",
                "/etc",
                "/var",
                "/state",
                "/run",
            ]
        );
        // "/run/" as a top is /run and below (Path::starts_with compares whole components)
        assert!(
            unmount_order("1 0 0:1 / /runner rw - tmpfs t rw\n", &[Path::new("/run/")]).is_empty()
        );
        assert_eq!(unescape_mountinfo(r"a\040b\134c\12"), "a b\\c\\12");
    }
}
