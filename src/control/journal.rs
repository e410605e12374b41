//! The boot journal: a ring of the last [`MAX_ENTRIES`] boots kept on STATE at
//! [`JOURNAL_REL`], so that the reason for a rollback outlives the boots that caused it.
//!
//! Stage 2 begins an entry with what the boot stage passed on the kernel command line and what
//! it knows itself ([`BootFacts`], [`record_begin`]), and ends it when the boot's fate is known
//! ([`End`], [`record_end`]). A trial boot whose entry has no end died before stage 2 could
//! write one (a kernel panic, a hang, a watchdog reset). keel-agent reads the journal for
//! Status and puts [`last_rollback`] into words for the operator.
//!
//! This module owns the journal's format, its small file I/O (std only, atomic replace) and the
//! pure logic over the entries. It never decides a boot, never touches the boot flags and never
//! panics on a journal it cannot read: a corrupt or oversized file is started anew with a
//! warning.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Where the journal lives, relative to STATE's mount point.
pub const JOURNAL_REL: &str = "boot/journal.json";
/// How many boots the journal keeps; older ones are dropped.
pub const MAX_ENTRIES: usize = 32;
/// The largest journal file read or written; a larger one is treated as corrupt.
pub const MAX_FILE_LEN: u64 = 256 * 1024;

/// The journal's path under STATE's mount point `state_dir`.
pub fn journal_path(state_dir: &Path) -> PathBuf {
    state_dir.join(JOURNAL_REL)
}

/// Why the boot stage refused to start a slot (and marked it failed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RefusalReason {
    /// The slot's squashfs image did not mount.
    SquashfsMountFailed,
    /// The slot's image has no kernel.
    KernelMissing,
    /// The slot's kernel does not match the digest in its record.
    KernelDigestMismatch,
    /// kexec_file_load refused the slot's kernel.
    KernelLoadFailed,
    /// The slot's image has no initramfs.
    InitramfsMissing,
    /// Blocks of the slot's image do not match its dm-verity tree.
    VerityCorruption,
}

impl RefusalReason {
    /// Every reason, in declaration order.
    pub const ALL: [RefusalReason; 6] = [
        RefusalReason::SquashfsMountFailed,
        RefusalReason::KernelMissing,
        RefusalReason::KernelDigestMismatch,
        RefusalReason::KernelLoadFailed,
        RefusalReason::InitramfsMissing,
        RefusalReason::VerityCorruption,
    ];

    /// The name on the kernel command line and in the journal, e.g. "kernel-load-failed".
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalReason::SquashfsMountFailed => "squashfs-mount-failed",
            RefusalReason::KernelMissing => "kernel-missing",
            RefusalReason::KernelDigestMismatch => "kernel-digest-mismatch",
            RefusalReason::KernelLoadFailed => "kernel-load-failed",
            RefusalReason::InitramfsMissing => "initramfs-missing",
            RefusalReason::VerityCorruption => "verity-corruption",
        }
    }

    /// The reason named `s` (see [`RefusalReason::as_str`]).
    pub fn from_name(s: &str) -> Option<RefusalReason> {
        RefusalReason::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// What the boot stage did, in words for the operator.
    fn words(self) -> &'static str {
        match self {
            RefusalReason::SquashfsMountFailed => {
                "the boot stage could not mount its image (the squashfs did not mount)"
            }
            RefusalReason::KernelMissing => "the boot stage found no kernel in its image",
            RefusalReason::KernelDigestMismatch => {
                "the boot stage refused its kernel (it does not match the slot's record)"
            }
            RefusalReason::KernelLoadFailed => {
                "the boot stage refused its kernel (kexec_file_load failed)"
            }
            RefusalReason::InitramfsMissing => "the boot stage found no initramfs in its image",
            RefusalReason::VerityCorruption => {
                "the boot stage found blocks of its image that do not match the image's \
                 dm-verity tree (verity corruption)"
            }
        }
    }
}

impl fmt::Display for RefusalReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One slot the boot stage refused during this power-on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// "a" or "b".
    pub slot: String,
    pub reason: RefusalReason,
}

/// The refusals in `value`, the value of the kernel parameter `keel.refused`
/// (`a:kernel-load-failed,b:squashfs-mount-failed`), and a warning for each item that is not
/// `slot:reason` with slot a or b and a known reason (such items are left out). Empty items are
/// ignored.
pub fn parse_refusals(value: &str) -> (Vec<Refusal>, Vec<String>) {
    let mut refusals = Vec::new();
    let mut warnings = Vec::new();
    for item in value.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let Some((slot, reason)) = item.split_once(':') else {
            warnings.push(format!(
                "keel.refused: {item:?} is not slot:reason (e.g. a:kernel-load-failed); ignored"
            ));
            continue;
        };
        if slot != "a" && slot != "b" {
            warnings.push(format!(
                "keel.refused: {item:?} names slot {slot:?}, which is neither a nor b; ignored"
            ));
            continue;
        }
        match RefusalReason::from_name(reason) {
            Some(reason) => refusals.push(Refusal {
                slot: slot.to_string(),
                reason,
            }),
            None => warnings.push(format!(
                "keel.refused: {item:?} has the unknown reason {reason:?} (known: {}); ignored",
                RefusalReason::ALL.map(RefusalReason::as_str).join(", ")
            )),
        }
    }
    (refusals, warnings)
}

/// The value of `keel.refused` for `refusals`: the inverse of [`parse_refusals`] for refusals
/// of slots a and b.
pub fn format_refusals(refusals: &[Refusal]) -> String {
    refusals
        .iter()
        .map(|r| format!("{}:{}", r.slot, r.reason))
        .collect::<Vec<_>>()
        .join(",")
}

/// What one boot was, as stage 2 learns it: the boot stage's command line and the slot itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootFacts {
    /// The slot that booted, "a" or "b" (`keel.slot`).
    pub slot: String,
    /// Whether this boot is a trial of the slot (`keel.boot=trial`), not a boot of a slot
    /// already marked successful.
    pub trial: bool,
    /// The boot stage's version (`keel.bootstage`), empty when not given.
    #[serde(default)]
    pub boot_stage: String,
    /// The running kernel's release (uname -r).
    #[serde(default)]
    pub kernel_release: String,
    /// The booted slot's OS version, empty when unknown.
    #[serde(default)]
    pub version: String,
    /// The slots the boot stage refused before it chose this one (`keel.refused`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<Refusal>,
    /// The slot whose tries ran out, so that the boot stage fell back from it to this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback_from: Option<String>,
    /// The successful slot the boot stage demoted so that this one boots: its last boots did not
    /// reach health (`keel.demoted`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub demoted: Option<String>,
}

/// How a boot ended, as far as stage 2 could record it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum End {
    /// The node became healthy (a trial slot was marked successful).
    Healthy,
    /// The node was not healthy by the health deadline; it rebooted to spend a try.
    DeadlineMissed,
    /// A reboot was asked for before the boot reached health.
    Reboot,
    /// A power off was asked for before the boot reached health.
    Shutdown,
}

/// One boot in the journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Increases by one per boot; never reused while the journal lasts.
    pub seq: u64,
    #[serde(flatten)]
    pub facts: BootFacts,
    /// How the boot ended; `None` while it runs, or when it died without stage 2 noticing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<End>,
}

/// The last [`MAX_ENTRIES`] boots, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Journal {
    pub entries: Vec<Entry>,
}

impl Journal {
    /// The journal at `path`. A missing file is an empty journal. A file that cannot be read,
    /// is larger than [`MAX_FILE_LEN`] or is not a journal gives an empty journal and a warning
    /// that says so (saving it then starts the file anew, losing the old entries).
    pub fn load(path: &Path) -> (Journal, Option<String>) {
        let anew = |why: String| {
            (
                Journal::default(),
                Some(format!(
                    "boot journal {} {why}; taken as empty",
                    path.display()
                )),
            )
        };
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return (Journal::default(), None)
            }
            Err(e) => return anew(format!("cannot be opened: {e}")),
        };
        let mut bytes = Vec::new();
        if let Err(e) = file.take(MAX_FILE_LEN + 1).read_to_end(&mut bytes) {
            return anew(format!("cannot be read: {e}"));
        }
        if bytes.len() as u64 > MAX_FILE_LEN {
            return anew(format!("is larger than {} KiB", MAX_FILE_LEN / 1024));
        }
        match serde_json::from_slice::<Journal>(&bytes) {
            Ok(mut j) => {
                j.trim();
                (j, None)
            }
            Err(e) => anew(format!("is not a boot journal ({e})")),
        }
    }

    /// Begin the entry of a new boot; returns its sequence number. The oldest entries are
    /// dropped beyond [`MAX_ENTRIES`].
    pub fn begin(&mut self, facts: BootFacts) -> u64 {
        let seq = self
            .entries
            .iter()
            .map(|e| e.seq)
            .max()
            .map_or(1, |s| s.saturating_add(1));
        self.entries.push(Entry {
            seq,
            facts,
            end: None,
        });
        self.trim();
        seq
    }

    /// Record how the last boot ended; only the first end counts. Returns whether it was
    /// recorded (false: no entry, or the last one has an end already).
    pub fn end_last(&mut self, end: End) -> bool {
        match self.entries.last_mut() {
            Some(e) if e.end.is_none() => {
                e.end = Some(end);
                true
            }
            _ => false,
        }
    }

    fn trim(&mut self) {
        let extra = self.entries.len().saturating_sub(MAX_ENTRIES);
        self.entries.drain(..extra);
    }

    /// The file's bytes: the newest entries that fit in [`MAX_FILE_LEN`].
    fn encode(&self) -> std::io::Result<Vec<u8>> {
        let mut j = self.clone();
        j.trim();
        loop {
            let bytes = serde_json::to_vec_pretty(&j).map_err(std::io::Error::other)?;
            if bytes.len() as u64 <= MAX_FILE_LEN {
                return Ok(bytes);
            }
            if j.entries.len() <= 1 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "one boot's entry alone is larger than {} KiB",
                        MAX_FILE_LEN / 1024
                    ),
                ));
            }
            j.entries.remove(0);
        }
    }

    /// Write the journal to `path` atomically: a temporary file beside it, flushed, renamed
    /// over it, and the directory flushed. Creates the directory.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let bytes = self.encode()?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        std::fs::create_dir_all(dir)?;
        let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
        tmp_name.push(".tmp");
        let tmp = dir.join(tmp_name);
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    }
}

/// Begin a boot's entry in the journal under `state_dir`: its sequence number and, when the
/// journal was corrupt and started anew, a warning to log.
pub fn begin_at(state_dir: &Path, facts: BootFacts) -> Result<(u64, Option<String>), String> {
    let path = journal_path(state_dir);
    let (mut j, warning) = Journal::load(&path);
    let seq = j.begin(facts);
    j.save(&path).map_err(|e| {
        format!(
            "cannot write the boot journal {}: {e}; this boot is not recorded",
            path.display()
        )
    })?;
    Ok((seq, warning.map(|w| format!("{w}: it is started anew"))))
}

/// Begin a boot's entry in the journal under `state_dir` (stage 2, once STATE is mounted);
/// returns its sequence number. A warning about a corrupt journal goes to stderr (see
/// [`begin_at`] to log it elsewhere).
pub fn record_begin(state_dir: &Path, facts: BootFacts) -> Result<u64, String> {
    let (seq, warning) = begin_at(state_dir, facts)?;
    if let Some(w) = warning {
        eprintln!("keel-init: {w}");
    }
    Ok(seq)
}

/// Record how this boot ended in the journal under `state_dir`. Only the first end of a boot
/// counts: a later one is ignored (`Ok`). An error when the journal has no boot to end (it was
/// lost or started anew) or cannot be written. It ends the journal's last entry, so call it only
/// after [`record_begin`] succeeded in this boot: otherwise it would end an earlier boot's.
pub fn record_end(state_dir: &Path, end: End) -> Result<(), String> {
    let path = journal_path(state_dir);
    let (mut j, warning) = Journal::load(&path);
    if j.entries.is_empty() {
        return Err(match warning {
            Some(w) => format!("{w}; the end of this boot ({end:?}) is not recorded"),
            None => format!(
                "boot journal {} has no boot to end; the end of this boot ({end:?}) is not \
                 recorded",
                path.display()
            ),
        });
    }
    if !j.end_last(end) {
        return Ok(());
    }
    j.save(&path).map_err(|e| {
        format!(
            "cannot write the boot journal {}: {e}; the end of this boot ({end:?}) is not \
             recorded",
            path.display()
        )
    })
}

/// The operator-facing reason for the most recent rollback in `entries` (oldest first), in
/// words; `None` when no entry records one. A rollback is an entry whose boot stage refused the
/// other slot ([`BootFacts::refused`]) or fell back from it ([`BootFacts::fallback_from`]).
pub fn last_rollback(entries: &[Entry]) -> Option<String> {
    for (i, e) in entries.iter().enumerate().rev() {
        let refused: Vec<&Refusal> = e
            .facts
            .refused
            .iter()
            .filter(|r| r.slot != e.facts.slot)
            .collect();
        if !refused.is_empty() {
            let clauses: Vec<String> = refused
                .iter()
                .map(|r| {
                    format!(
                        "{}: {} and marked it failed",
                        slot_name(&r.slot, version_of(&entries[..i], &r.slot)),
                        r.reason.words()
                    )
                })
                .collect();
            return Some(format!(
                "{}; slot {} booted in the same power-on",
                clauses.join("; "),
                e.facts.slot
            ));
        }
        if let Some(s) = e.facts.fallback_from.as_deref() {
            return Some(fallback_words(&entries[..i], s, &e.facts.slot));
        }
        if let Some(s) = e.facts.demoted.as_deref() {
            return Some(demoted_words(&entries[..i], s, &e.facts.slot));
        }
    }
    None
}

/// Why the successful slot `demoted` was demoted, from its boots in `before` since it last
/// reached health; `booted` is the slot that boots instead.
fn demoted_words(before: &[Entry], demoted: &str, booted: &str) -> String {
    let since = before
        .iter()
        .rposition(|e| e.facts.slot == demoted && e.end == Some(End::Healthy))
        .map_or(0, |p| p + 1);
    let boots: Vec<&Entry> = before[since..]
        .iter()
        .filter(|e| e.facts.slot == demoted && !e.facts.trial)
        .collect();
    // a successful slot is not rewritten without a trial boot in between, so its last entry
    // with a version (healthy or not) names the image that was demoted
    let version = before
        .iter()
        .rfind(|e| e.facts.slot == demoted && !e.facts.version.is_empty())
        .map(|e| e.facts.version.as_str());
    let count = |end: Option<End>| boots.iter().filter(|e| e.end == end).count();
    let mut ends = Vec::new();
    for (end, words) in [
        (Some(End::DeadlineMissed), "health deadline missed"),
        (
            None,
            "no recorded end (kernel panic, hang, watchdog reset or power cut)",
        ),
        (Some(End::Reboot), "a reboot before health"),
        (Some(End::Shutdown), "a power off before health"),
    ] {
        let n = count(end);
        if n > 0 {
            ends.push(format!("{n} {words}"));
        }
    }
    let seen = if ends.is_empty() {
        // the boots died before stage 2 could record them
        "none reached stage 2 (the slot's kernel or its root failed before)".to_string()
    } else {
        ends.join(", ")
    };
    format!(
        "{}: marked successful, but its last {} boots did not reach health ({seen}); demoted, \
         slot {booted} boots instead (health missed)",
        slot_name(demoted, version),
        crate::bootctl::MAX_UNHEALTHY_BOOTS
    )
}

/// "slot b (2.0.1)", or "slot b" without a version.
fn slot_name(slot: &str, version: Option<&str>) -> String {
    match version {
        Some(v) => format!("slot {slot} ({v})"),
        None => format!("slot {slot}"),
    }
}

/// The entries of `before` (oldest first) that belong to the latest attempt of `slot`: back to
/// its previous non-trial boot or its previous rollback, either of which ends an earlier
/// attempt (a slot that failed boots again only after a new install).
fn attempt<'a>(before: &'a [Entry], slot: &str) -> Vec<&'a Entry> {
    let start = before
        .iter()
        .rposition(|e| {
            (e.facts.slot == slot && !e.facts.trial)
                || e.facts.fallback_from.as_deref() == Some(slot)
                || e.facts.demoted.as_deref() == Some(slot)
                || e.facts.refused.iter().any(|r| r.slot == slot)
        })
        .map_or(0, |p| p + 1);
    before[start..]
        .iter()
        .filter(|e| e.facts.slot == slot && e.facts.trial)
        .collect()
}

/// The version of `slot` in its latest attempt, when a trial entry knows it.
fn version_of<'a>(before: &'a [Entry], slot: &str) -> Option<&'a str> {
    attempt(before, slot)
        .into_iter()
        .rfind(|e| !e.facts.version.is_empty())
        .map(|e| e.facts.version.as_str())
}

/// Why `failed`'s tries ran out, from its trial entries in `before`; `booted` is the slot
/// fallen back to.
fn fallback_words(before: &[Entry], failed: &str, booted: &str) -> String {
    let trials = attempt(before, failed);
    if trials.is_empty() {
        return format!(
            "slot {failed}: none of its trial boots reached the slot's services (the new kernel \
             panicked, hung or was reset by the watchdog before its userspace ran); rolled back \
             to slot {booted}"
        );
    }
    let name = slot_name(failed, version_of(before, failed));
    let count = |end: Option<End>| trials.iter().filter(|e| e.end == end).count();
    let why = if count(Some(End::DeadlineMissed)) > 0 {
        format!(
            "did not reach health in its trial boots (health deadline missed in {} of them)",
            count(Some(End::DeadlineMissed))
        )
    } else if count(None) == trials.len() {
        "its trial boots ended before health (kernel panic, hang or watchdog reset)".to_string()
    } else {
        let mut ends = Vec::new();
        for (end, words) in [
            (
                None,
                "without a recorded end (kernel panic, hang or watchdog reset)",
            ),
            (Some(End::Reboot), "by a reboot"),
            (Some(End::Shutdown), "by a power off"),
            (Some(End::Healthy), "healthy but not marked successful"),
        ] {
            let n = count(end);
            if n > 0 {
                ends.push(format!("{n} {words}"));
            }
        }
        format!(
            "its tries ran out before it was marked successful (trial boots ended: {})",
            ends.join(", ")
        )
    };
    format!("{name}: {why}; rolled back to slot {booted}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(slot: &str, trial: bool, version: &str) -> BootFacts {
        BootFacts {
            slot: slot.into(),
            trial,
            boot_stage: "1.0.0".into(),
            kernel_release: "6.1.0-47-amd64".into(),
            version: version.into(),
            refused: Vec::new(),
            fallback_from: None,
            demoted: None,
        }
    }

    /// A journal from (facts, end) pairs, oldest first.
    fn journal(boots: Vec<(BootFacts, Option<End>)>) -> Journal {
        let mut j = Journal::default();
        for (f, end) in boots {
            j.begin(f);
            if let Some(e) = end {
                assert!(j.end_last(e));
            }
        }
        j
    }

    fn fallback(slot: &str, from: &str, version: &str) -> BootFacts {
        BootFacts {
            fallback_from: Some(from.into()),
            ..facts(slot, false, version)
        }
    }

    #[test]
    fn refusals_parse_format_round_trip_exhaustively_up_to_three() {
        let all: Vec<Refusal> = ["a", "b"]
            .into_iter()
            .flat_map(|s| {
                RefusalReason::ALL.into_iter().map(move |reason| Refusal {
                    slot: s.into(),
                    reason,
                })
            })
            .collect();
        let mut lists: Vec<Vec<Refusal>> = vec![Vec::new()];
        let mut last = lists.clone();
        for _ in 0..3 {
            last = last
                .iter()
                .flat_map(|l| {
                    all.iter().map(move |r| {
                        let mut l = l.clone();
                        l.push(r.clone());
                        l
                    })
                })
                .collect();
            lists.extend(last.iter().cloned());
        }
        assert_eq!(lists.len(), 1 + 12 + 144 + 1728);
        for l in &lists {
            let text = format_refusals(l);
            let (back, warnings) = parse_refusals(&text);
            assert_eq!(&back, l, "{text:?}");
            assert!(warnings.is_empty(), "{text:?}: {warnings:?}");
        }
    }

    #[test]
    fn bad_refusal_items_are_warned_about_and_left_out() {
        let (r, w) = parse_refusals(" a:kernel-load-failed,,c:kernel-missing,b:sad,b,");
        assert_eq!(
            r,
            vec![Refusal {
                slot: "a".into(),
                reason: RefusalReason::KernelLoadFailed
            }]
        );
        assert_eq!(w.len(), 3, "{w:?}");
        assert!(w[0].contains("neither a nor b"), "{}", w[0]);
        assert!(w[1].contains("unknown reason \"sad\""), "{}", w[1]);
        assert!(w[2].contains("not slot:reason"), "{}", w[2]);
        assert_eq!(parse_refusals(""), (Vec::new(), Vec::new()));
    }

    #[test]
    fn wire_names_are_kebab_case() {
        for r in RefusalReason::ALL {
            assert_eq!(
                serde_json::to_string(&r).unwrap(),
                format!("\"{}\"", r.as_str())
            );
        }
        assert_eq!(
            serde_json::to_string(&End::DeadlineMissed).unwrap(),
            "\"deadline-missed\""
        );
        let e = Entry {
            seq: 3,
            facts: BootFacts {
                refused: vec![Refusal {
                    slot: "a".into(),
                    reason: RefusalReason::SquashfsMountFailed,
                }],
                ..facts("b", true, "2.0.1")
            },
            end: Some(End::Healthy),
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["slot"], "b");
        assert_eq!(v["refused"][0]["reason"], "squashfs-mount-failed");
        assert_eq!(v["end"], "healthy");
        assert_eq!(serde_json::from_value::<Entry>(v).unwrap(), e);
        // an entry as an older writer would have left it
        let old: Entry = serde_json::from_str(r#"{"seq":1,"slot":"a","trial":false}"#).unwrap();
        assert_eq!(old.end, None);
        assert!(old.facts.refused.is_empty());
    }

    #[test]
    fn begin_numbers_and_trims_end_last_only_once() {
        let mut j = Journal::default();
        assert!(!j.end_last(End::Reboot));
        for n in 1..=40u64 {
            assert_eq!(j.begin(facts("a", false, "1")), n);
        }
        assert_eq!(j.entries.len(), MAX_ENTRIES);
        assert_eq!(j.entries[0].seq, 9);
        assert!(j.end_last(End::Healthy));
        assert!(!j.end_last(End::Reboot));
        assert_eq!(j.entries[MAX_ENTRIES - 1].end, Some(End::Healthy));
        assert_eq!(j.begin(facts("a", false, "1")), 41);
    }

    #[test]
    fn save_load_and_a_corrupt_or_large_file_starts_anew() {
        let t = tempfile::tempdir().unwrap();
        let state = t.path();
        let p = journal_path(state);
        assert_eq!(Journal::load(&p), (Journal::default(), None));
        assert_eq!(record_begin(state, facts("a", true, "1")).unwrap(), 1);
        record_end(state, End::DeadlineMissed).unwrap();
        // a second end is ignored
        record_end(state, End::Reboot).unwrap();
        let (j, w) = Journal::load(&p);
        assert_eq!(w, None);
        assert_eq!(j.entries.len(), 1);
        assert_eq!(j.entries[0].end, Some(End::DeadlineMissed));
        assert!(!p.with_file_name("journal.json.tmp").exists());

        std::fs::write(&p, "{not json").unwrap();
        let (j, w) = Journal::load(&p);
        assert!(j.entries.is_empty());
        assert!(w.unwrap().contains("is not a boot journal"));
        // the agent reads it as empty: no rollback to show, no error
        let e = record_end(state, End::Healthy).unwrap_err();
        assert!(
            e.contains("taken as empty") && e.contains("not recorded"),
            "{e}"
        );
        let (seq, w) = begin_at(state, facts("b", false, "2")).unwrap();
        assert_eq!(seq, 1);
        assert!(w.unwrap().contains("started anew"));

        std::fs::write(&p, vec![b' '; MAX_FILE_LEN as usize + 1]).unwrap();
        let (j, w) = Journal::load(&p);
        assert!(j.entries.is_empty());
        assert!(w.unwrap().contains("larger than 256 KiB"));

        // nothing saved is ever too large to load: the oldest entries give way
        let mut j = Journal::default();
        for _ in 0..MAX_ENTRIES {
            j.begin(BootFacts {
                kernel_release: "x".repeat(16 * 1024),
                ..facts("a", false, "1")
            });
        }
        j.save(&p).unwrap();
        let (back, w) = Journal::load(&p);
        assert_eq!(w, None);
        assert!(back.entries.len() < MAX_ENTRIES && !back.entries.is_empty());
        assert_eq!(back.entries.last(), j.entries.last());
    }

    #[test]
    fn no_rollback_in_an_ordinary_journal() {
        assert_eq!(last_rollback(&[]), None);
        let j = journal(vec![
            (facts("a", false, "1"), Some(End::Healthy)),
            (facts("b", true, "2"), Some(End::Healthy)),
            (facts("b", false, "2"), None),
        ]);
        assert_eq!(last_rollback(&j.entries), None);
    }

    #[test]
    fn a_refused_kernel_is_named_with_the_slot_and_its_version() {
        let j = journal(vec![
            (facts("a", false, "2.0.0"), Some(End::Healthy)),
            (facts("b", true, "2.0.1"), Some(End::Reboot)),
            (
                BootFacts {
                    refused: vec![Refusal {
                        slot: "b".into(),
                        reason: RefusalReason::KernelLoadFailed,
                    }],
                    ..facts("a", false, "2.0.0")
                },
                None,
            ),
        ]);
        assert_eq!(
            last_rollback(&j.entries).unwrap(),
            "slot b (2.0.1): the boot stage refused its kernel (kexec_file_load failed) and \
             marked it failed; slot a booted in the same power-on"
        );
    }

    #[test]
    fn each_refusal_reason_in_words() {
        let expected = [
            (
                RefusalReason::SquashfsMountFailed,
                "slot a: the boot stage could not mount its image (the squashfs did not mount) \
                 and marked it failed; slot b booted in the same power-on",
            ),
            (
                RefusalReason::KernelMissing,
                "slot a: the boot stage found no kernel in its image and marked it failed; slot \
                 b booted in the same power-on",
            ),
            (
                RefusalReason::KernelDigestMismatch,
                "slot a: the boot stage refused its kernel (it does not match the slot's record) \
                 and marked it failed; slot b booted in the same power-on",
            ),
            (
                RefusalReason::KernelLoadFailed,
                "slot a: the boot stage refused its kernel (kexec_file_load failed) and marked \
                 it failed; slot b booted in the same power-on",
            ),
            (
                RefusalReason::InitramfsMissing,
                "slot a: the boot stage found no initramfs in its image and marked it failed; \
                 slot b booted in the same power-on",
            ),
        ];
        for (reason, words) in expected {
            // slot a's last boot was a good one (another install since): its version is not
            // taken for the refused image's
            let j = journal(vec![
                (facts("a", false, "1.0.0"), Some(End::Healthy)),
                (
                    BootFacts {
                        refused: vec![Refusal {
                            slot: "a".into(),
                            reason,
                        }],
                        ..facts("b", false, "1.1.0")
                    },
                    None,
                ),
                (facts("b", false, "1.1.0"), Some(End::Reboot)),
            ]);
            assert_eq!(last_rollback(&j.entries).unwrap(), words);
        }
    }

    #[test]
    fn a_demoted_successful_slot_is_explained_from_its_boots_since_health() {
        let j = journal(vec![
            (facts("b", true, "2.0.1"), Some(End::Healthy)),
            (facts("b", false, "2.0.1"), Some(End::Healthy)),
            (facts("b", false, "2.0.1"), Some(End::DeadlineMissed)),
            (facts("b", false, "2.0.1"), None),
            (facts("b", false, "2.0.1"), Some(End::DeadlineMissed)),
            (
                BootFacts {
                    demoted: Some("b".into()),
                    ..facts("a", false, "2.0.0")
                },
                Some(End::Healthy),
            ),
        ]);
        assert_eq!(
            last_rollback(&j.entries).unwrap(),
            "slot b (2.0.1): marked successful, but its last 3 boots did not reach health (2 \
             health deadline missed, 1 no recorded end (kernel panic, hang, watchdog reset or \
             power cut)); demoted, slot a boots instead (health missed)"
        );
        // boots that never reached stage 2 leave no entries at all
        let j = journal(vec![
            (facts("b", false, "2.0.1"), Some(End::Healthy)),
            (
                BootFacts {
                    demoted: Some("b".into()),
                    ..facts("a", false, "2.0.0")
                },
                None,
            ),
        ]);
        assert_eq!(
            last_rollback(&j.entries).unwrap(),
            "slot b (2.0.1): marked successful, but its last 3 boots did not reach health (none \
             reached stage 2 (the slot's kernel or its root failed before)); demoted, slot a \
             boots instead (health missed)"
        );
    }

    #[test]
    fn missed_health_deadlines_are_counted() {
        let j = journal(vec![
            (facts("a", false, "2.0.0"), Some(End::Healthy)),
            (facts("b", true, "2.0.1"), Some(End::DeadlineMissed)),
            (facts("b", true, "2.0.1"), None),
            (facts("b", true, "2.0.1"), Some(End::DeadlineMissed)),
            (fallback("a", "b", "2.0.0"), Some(End::Healthy)),
        ]);
        assert_eq!(
            last_rollback(&j.entries).unwrap(),
            "slot b (2.0.1): did not reach health in its trial boots (health deadline missed in \
             2 of them); rolled back to slot a"
        );
    }

    #[test]
    fn trial_boots_without_an_end_died_before_health() {
        let j = journal(vec![
            (facts("b", false, "2.0.0"), Some(End::Healthy)),
            (facts("a", true, "3.0.0"), None),
            (facts("a", true, "3.0.0"), None),
            (fallback("b", "a", "2.0.0"), None),
        ]);
        assert_eq!(
            last_rollback(&j.entries).unwrap(),
            "slot a (3.0.0): its trial boots ended before health (kernel panic, hang or \
             watchdog reset); rolled back to slot b"
        );
    }

    #[test]
    fn no_trial_entry_means_the_kernel_never_reached_userspace() {
        // slot b's earlier attempt (2.0.1) ended in a rollback; the new image in b never got
        // as far as stage 2, so neither its version nor the old attempt's trials count
        let j = journal(vec![
            (facts("b", true, "2.0.1"), Some(End::DeadlineMissed)),
            (fallback("a", "b", "2.0.0"), Some(End::Healthy)),
            (facts("a", false, "2.0.0"), Some(End::Reboot)),
            (fallback("a", "b", "2.0.0"), None),
        ]);
        assert_eq!(
            last_rollback(&j.entries).unwrap(),
            "slot b: none of its trial boots reached the slot's services (the new kernel \
             panicked, hung or was reset by the watchdog before its userspace ran); rolled back \
             to slot a"
        );
    }

    #[test]
    fn mixed_trial_ends_are_listed() {
        let j = journal(vec![
            (facts("b", true, "2.0.1"), Some(End::Reboot)),
            (facts("b", true, "2.0.1"), None),
            (fallback("a", "b", "2.0.0"), None),
        ]);
        assert_eq!(
            last_rollback(&j.entries).unwrap(),
            "slot b (2.0.1): its tries ran out before it was marked successful (trial boots \
             ended: 1 without a recorded end (kernel panic, hang or watchdog reset), 1 by a \
             reboot); rolled back to slot a"
        );
    }

    #[test]
    fn the_most_recent_rollback_wins() {
        let j = journal(vec![
            (facts("b", true, "2.0.1"), Some(End::DeadlineMissed)),
            (fallback("a", "b", "2.0.0"), Some(End::Healthy)),
            (
                BootFacts {
                    refused: vec![Refusal {
                        slot: "b".into(),
                        reason: RefusalReason::KernelMissing,
                    }],
                    ..facts("a", false, "2.0.0")
                },
                Some(End::Healthy),
            ),
            (facts("a", false, "2.0.0"), Some(End::Healthy)),
        ]);
        assert_eq!(
            last_rollback(&j.entries).unwrap(),
            "slot b: the boot stage found no kernel in its image and marked it failed; slot a \
             booted in the same power-on"
        );
    }
}
