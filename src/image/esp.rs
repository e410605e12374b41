//! The boot stage on the EFI system partition: a FAT32 file system holding the UKI at the
//! removable-media path (`/EFI/BOOT/BOOTX64.EFI`) and `/keel/boot-stage.json` describing it.
//!
//! The boot stage is not A/B: one UKI, changed only by `keel-image build disk` (a new disk) or
//! the explicit `keel-image boot-stage install` (offline, on an existing disk). Replacing it
//! writes the new UKI under a temporary name, reads it back, and only then renames it over the
//! old one, so an interrupted install leaves a complete UKI behind.
//!
//! The file system is made by Debian's `mkfs.fat` (dosfstools) and changed with `mtools`
//! (`mmd`, `mcopy`, `mren`, `mdel` on `IMAGE@@OFFSET`): the `fatfs` crate (0.3.6, its latest
//! release) writes long-name entries for the `.` and `..` of new directories, which
//! `fsck.fat` reports as damage. Before mtools touches a disk, the FAT boot sector is checked
//! to lie wholly inside the ESP, so nothing outside the partition can be written.

use super::bootfiles::{BootStageRecord, ESP_BOOT_STAGE_RECORD, ESP_UKI};
use super::release::{self, sha256_file};
use super::uki::{self, UkiInputs};
use super::ImageError;
use crate::block::FileDevice;
use crate::disk::{self, MIB};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The kernel command line every boot stage starts with; `--cmdline` words are appended.
/// `lockdown=integrity`: the boot stage runs locked down, so its kexec_file_load accepts only a
/// slot kernel whose signature the kernel's keyrings verify (Debian's kernels: the Debian Secure
/// Boot CA in the firmware's db, loaded into the platform keyring). A machine without that CA in
/// db cannot kexec any slot kernel; the boot stage then boots the last bootable slot's root under
/// its own kernel rather than nothing (see keel-init's stage 1).
pub const BASE_CMDLINE: &str =
    "console=tty0 console=ttyS0 panic=10 i6300esb.nowayout=1 lockdown=integrity";

/// The volume label of the ESP's file system.
pub const VOLUME_LABEL: &str = "KEELOS-ESP";

/// FAT32 needs at least 65525 clusters; with 512-byte clusters that is about 33 MiB plus the
/// tables. Smaller ESPs (tests) get whatever FAT type mkfs.fat chooses.
const FAT32_MIN: u64 = 40 * MIB;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ImageError {
    let what = what.into();
    move |e| ImageError::Io { what, source: e }
}

fn tool(tool: &'static str, cmd: &mut Command) -> Result<String, ImageError> {
    let o = cmd
        .env("MTOOLS_SKIP_CHECK", "1")
        .env("MTOOLS_LOWER_CASE", "0")
        .output()
        .map_err(|e| ImageError::Spawn { tool, source: e })?;
    if !o.status.success() {
        return Err(ImageError::Tool {
            tool,
            status: o.status.to_string(),
            stderr: String::from_utf8_lossy(&o.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// A FAT file system inside a file: the file and the byte offset where the file system starts.
#[derive(Debug, Clone)]
pub struct Fat {
    pub file: PathBuf,
    pub offset: u64,
}

impl Fat {
    fn spec(&self) -> String {
        format!("{}@@{}", self.file.display(), self.offset)
    }

    fn mtool(&self, name: &'static str, args: &[&str]) -> Result<String, ImageError> {
        tool(
            name,
            Command::new(name).arg("-i").arg(self.spec()).args(args),
        )
    }

    /// The names in directory `dir` (`None` if there is no such directory).
    fn list(&self, dir: &str) -> Result<Option<Vec<String>>, ImageError> {
        match self.mtool("mdir", &["-b", &format!("::/{dir}")]) {
            Ok(out) => Ok(Some(
                out.lines()
                    .filter_map(|l| l.trim_end_matches('/').rsplit('/').next())
                    .map(str::to_string)
                    .collect(),
            )),
            Err(ImageError::Tool { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn ensure_dir(&self, dir: &str) -> Result<(), ImageError> {
        let mut at = String::new();
        for part in dir.split('/').filter(|p| !p.is_empty()) {
            let parent = at.clone();
            at = if at.is_empty() {
                part.to_string()
            } else {
                format!("{at}/{part}")
            };
            let here = self.list(&parent)?.unwrap_or_default();
            if !here.iter().any(|n| n.eq_ignore_ascii_case(part)) {
                self.mtool("mmd", &[&format!("::/{at}")])?;
            }
        }
        Ok(())
    }

    /// Copy `/path` out of the file system into `to`.
    pub fn copy_out(&self, path: &str, to: &Path) -> Result<(), ImageError> {
        let to_s = to.display().to_string();
        self.mtool("mcopy", &["-n", "-o", &format!("::/{path}"), &to_s])
            .map(|_| ())
    }

    /// Write `src` as `dir/name` via `dir/tmp`: copied in, copied back out and compared, then
    /// renamed over `name` (the old file kept as `old` until the rename is done).
    fn replace(
        &self,
        dir: &str,
        name: &str,
        tmp: &str,
        old: &str,
        src: &Path,
        work: &Path,
    ) -> Result<(), ImageError> {
        self.ensure_dir(dir)?;
        let at = |n: &str| format!("::/{dir}/{n}");
        let has = |n: &str, names: &[String]| names.iter().any(|x| x.eq_ignore_ascii_case(n));
        let names = self.list(dir)?.unwrap_or_default();
        for stale in [tmp, old] {
            if has(stale, &names) {
                self.mtool("mdel", &[&at(stale)])?;
            }
        }
        let src_s = src.display().to_string();
        self.mtool("mcopy", &["-n", "-o", &src_s, &at(tmp)])?;
        let back = work.join(format!("readback-{tmp}"));
        self.copy_out(&format!("{dir}/{tmp}"), &back)?;
        let same = std::fs::read(&back).map_err(io(back.display().to_string()))?
            == std::fs::read(src).map_err(io(src_s.clone()))?;
        let _ = std::fs::remove_file(&back);
        if !same {
            return Err(ImageError::Install {
                what: format!("/{dir}/{name}"),
                why: format!(
                    "/{dir}/{tmp} read back different from {src_s}; the old file is untouched"
                ),
            });
        }
        let had_old = has(name, &names);
        if had_old {
            self.mtool("mren", &[&at(name), old])?;
        }
        self.mtool("mren", &[&at(tmp), name])?;
        if had_old {
            self.mtool("mdel", &[&at(old)])?;
        }
        Ok(())
    }
}

/// Make a new FAT file system (FAT32 when the partition is large enough) in the file `img`,
/// which is `len` bytes.
pub fn format(img: &Path, len: u64) -> Result<(), ImageError> {
    let mut cmd = Command::new("mkfs.fat");
    // --invariant: a fixed volume id and creation time instead of random and current ones
    cmd.args(["-S", "512", "-n", VOLUME_LABEL, "--invariant"]);
    if len >= FAT32_MIN {
        cmd.args(["-F", "32", "-s", "1"]);
    }
    cmd.arg(img);
    tool("mkfs.fat", &mut cmd).map(|_| ())
}

/// Put the boot stage (the UKI and its record) into the FAT file system `fat`.
pub fn write_boot_stage(
    fat: &Fat,
    uki_path: &Path,
    record: &BootStageRecord,
) -> Result<(), ImageError> {
    let work = tempfile::tempdir().map_err(io("a work directory"))?;
    let json_path = work.path().join("boot-stage.json");
    let json = serde_json::to_vec_pretty(record).map_err(|e| ImageError::Io {
        what: "boot-stage.json".into(),
        source: std::io::Error::other(e),
    })?;
    std::fs::write(&json_path, json).map_err(io(json_path.display().to_string()))?;
    fat.replace(
        "EFI/BOOT",
        "BOOTX64.EFI",
        "BOOTX64.NEW",
        "BOOTX64.OLD",
        uki_path,
        work.path(),
    )?;
    fat.replace(
        "keel",
        "boot-stage.json",
        "boot-stage.new",
        "boot-stage.old",
        &json_path,
        work.path(),
    )
}

/// The boot stage record and the UKI read back from the FAT file system `fat`.
pub fn read_boot_stage(fat: &Fat) -> Result<(BootStageRecord, Vec<u8>), ImageError> {
    let work = tempfile::tempdir().map_err(io("a work directory"))?;
    let (j, u) = (work.path().join("rec.json"), work.path().join("uki.efi"));
    fat.copy_out(ESP_BOOT_STAGE_RECORD, &j)?;
    fat.copy_out(ESP_UKI, &u)?;
    let json = std::fs::read(&j).map_err(io(j.display().to_string()))?;
    let rec = serde_json::from_slice(&json).map_err(|e| ImageError::Io {
        what: format!("/{ESP_BOOT_STAGE_RECORD} on the ESP"),
        source: std::io::Error::other(e),
    })?;
    let uki = std::fs::read(&u).map_err(io(u.display().to_string()))?;
    Ok((rec, uki))
}

/// The size in bytes of the FAT file system whose boot sector is `bs`, if it is one.
pub fn fat_size(bs: &[u8]) -> Option<u64> {
    if bs.len() < 512 || bs[510..512] != [0x55, 0xAA] {
        return None;
    }
    let sector = u64::from(u16::from_le_bytes([bs[11], bs[12]]));
    let small = u64::from(u16::from_le_bytes([bs[19], bs[20]]));
    let large = u64::from(u32::from_le_bytes([bs[32], bs[33], bs[34], bs[35]]));
    let is_fat = bs[54..57] == *b"FAT" || bs[82..85] == *b"FAT";
    if !is_fat || !sector.is_power_of_two() || sector < 512 {
        return None;
    }
    let sectors = if small != 0 { small } else { large };
    Some(sectors * sector)
}

/// A built boot stage: the UKI file and its record.
#[derive(Debug, Clone)]
pub struct BootStage {
    pub uki: PathBuf,
    pub record: BootStageRecord,
}

/// The kernel command line of a boot stage: [`BASE_CMDLINE`] and the extra words.
pub fn cmdline(extra: &str) -> String {
    let extra = extra.split_whitespace().collect::<Vec<_>>().join(" ");
    if extra.is_empty() {
        BASE_CMDLINE.to_string()
    } else {
        format!("{BASE_CMDLINE} {extra}")
    }
}

/// Build the boot stage's UKI from a release directory (its vmlinuz, initramfs.img and
/// version) into `work`.
pub fn boot_stage(
    release_dir: &Path,
    extra_cmdline: &str,
    stub: &Path,
    work: &Path,
) -> Result<BootStage, ImageError> {
    let mf = release_dir.join(release::BUILD_RECORD_FILE);
    let manifest: serde_json::Value = std::fs::read(&mf)
        .map_err(io(format!(
            "{} (is {} a release made by `keel-image build release`?)",
            mf.display(),
            release_dir.display()
        )))
        .and_then(|b| {
            serde_json::from_slice(&b).map_err(|e| ImageError::Io {
                what: mf.display().to_string(),
                source: std::io::Error::other(e),
            })
        })?;
    let field = |k: &str| {
        manifest[k]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| ImageError::Io {
                what: mf.display().to_string(),
                source: std::io::Error::other(format!("no {k} in the release manifest")),
            })
    };
    let version = field("version")?;
    let kernel_release = field("kernel_release")?;
    let cmdline = cmdline(extra_cmdline);
    let uki_path = work.join("BOOTX64.EFI");
    let parts = work.join("uki-parts");
    std::fs::create_dir_all(&parts).map_err(io(parts.display().to_string()))?;
    let inputs = UkiInputs {
        stub: stub.to_path_buf(),
        kernel: release_dir.join(release::KERNEL_FILE),
        initramfs: release_dir.join(release::INITRAMFS_FILE),
        cmdline: cmdline.clone(),
        os_release: release::os_release(&version),
    };
    for (what, p) in [
        ("the boot stage's kernel", &inputs.kernel),
        ("the boot stage's initramfs", &inputs.initramfs),
    ] {
        if !p.is_file() {
            return Err(ImageError::MissingInput {
                what: what.into(),
                path: p.display().to_string(),
            });
        }
    }
    uki::build(&inputs, &uki_path, &parts)?;
    let (uki_sha256, uki_len) = sha256_file(&uki_path)?;
    Ok(BootStage {
        uki: uki_path,
        record: BootStageRecord {
            version,
            kernel_release,
            cmdline,
            uki_sha256,
            uki_len,
        },
    })
}

/// A new ESP image file of `len` bytes at `out` holding the boot stage.
pub fn make_image(out: &Path, len: u64, stage: &BootStage) -> Result<(), ImageError> {
    let _ = std::fs::remove_file(out);
    let f = std::fs::File::create(out).map_err(io(out.display().to_string()))?;
    f.set_len(len).map_err(io(out.display().to_string()))?;
    drop(f);
    format(out, len)?;
    write_boot_stage(
        &Fat {
            file: out.to_path_buf(),
            offset: 0,
        },
        &stage.uki,
        &stage.record,
    )
}

/// The ESP of a KeelOS disk (the disk must carry the KeelOS partition labels): its offset and
/// length.
fn esp_range(disk_path: &Path) -> Result<(u64, u64), ImageError> {
    let dev = FileDevice::open(disk_path, false)?;
    let layout = disk::open(&dev)?;
    Ok((layout.esp.offset, layout.esp.len))
}

fn read_at(disk_path: &Path, at: u64, len: usize) -> Result<Vec<u8>, ImageError> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(disk_path).map_err(io(disk_path.display().to_string()))?;
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, at)
        .map_err(io(format!("reading the ESP of {}", disk_path.display())))?;
    Ok(b)
}

/// Replace the boot stage of the KeelOS disk at `disk_path` (offline). The UKI is checked
/// before anything is written, and the ESP's FAT file system must lie wholly inside the ESP,
/// so only the ESP's range of the disk is touched. An ESP that holds nothing at all (a disk
/// made before boot stages) is formatted first; one holding something that is not a FAT file
/// system is refused.
pub fn install_on_disk(disk_path: &Path, stage: &BootStage) -> Result<(), ImageError> {
    let uki_bytes = std::fs::read(&stage.uki).map_err(io(stage.uki.display().to_string()))?;
    uki::check_shape(&uki_bytes).map_err(|e| ImageError::Pe {
        path: stage.uki.display().to_string(),
        source: e,
    })?;
    let (offset, len) = esp_range(disk_path)?;
    let head = read_at(disk_path, offset, 4096.min(len as usize))?;
    let refuse = |why: String| ImageError::Install {
        what: format!("a boot stage on {}", disk_path.display()),
        why,
    };
    match fat_size(&head) {
        Some(n) if n <= len => {}
        Some(n) => {
            return Err(refuse(format!(
                "the FAT file system in its ESP claims {n} bytes but the ESP has {len}; \
                 refusing to write past the partition"
            )))
        }
        None if head.iter().all(|&b| b == 0) => {
            // an empty ESP (a disk made before boot stages): format it in a file, then copy
            let dir = disk_path.parent().unwrap_or(Path::new("."));
            let tmp = tempfile::Builder::new()
                .prefix(".keel-esp-")
                .tempfile_in(dir)
                .map_err(io(format!("a temporary ESP in {}", dir.display())))?;
            tmp.as_file()
                .set_len(len)
                .map_err(io(tmp.path().display().to_string()))?;
            format(tmp.path(), len)?;
            let b = std::fs::read(tmp.path()).map_err(io(tmp.path().display().to_string()))?;
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(disk_path)
                .map_err(io(disk_path.display().to_string()))?;
            f.write_all_at(&b, offset)
                .map_err(io(format!("writing the ESP of {}", disk_path.display())))?;
            f.sync_all().map_err(io(disk_path.display().to_string()))?;
        }
        None => {
            return Err(refuse(
                "its ESP holds something that is not a FAT file system; refusing to overwrite it"
                    .into(),
            ))
        }
    }
    let fat = Fat {
        file: disk_path.to_path_buf(),
        offset,
    };
    // room for the new UKI beside the old one
    let free = free_bytes(&fat)?;
    if free < uki_bytes.len() as u64 + 64 * 1024 {
        return Err(ImageError::TooLarge {
            what: format!("the new boot stage {}", stage.uki.display()),
            len: uki_bytes.len() as u64,
            room: free,
        });
    }
    write_boot_stage(&fat, &stage.uki, &stage.record)?;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(disk_path)
        .map_err(io(disk_path.display().to_string()))?;
    f.sync_all().map_err(io(disk_path.display().to_string()))
}

/// Free bytes of the file system, from `minfo`'s and `mdir`'s view: `mdir` prints
/// "N bytes free".
fn free_bytes(fat: &Fat) -> Result<u64, ImageError> {
    let out = fat.mtool("mdir", &["::/"])?;
    out.lines()
        .find_map(|l| {
            let l = l.trim();
            l.strip_suffix("bytes free")
                .map(|n| n.split_whitespace().collect::<String>())
                .and_then(|n| n.parse::<u64>().ok())
        })
        .ok_or_else(|| ImageError::Tool {
            tool: "mdir",
            status: "success".into(),
            stderr: format!("no \"bytes free\" line in its output: {out}"),
        })
}

/// The boot stage record and UKI of the KeelOS disk at `disk_path`.
pub fn show_on_disk(disk_path: &Path) -> Result<(BootStageRecord, Vec<u8>), ImageError> {
    let (offset, len) = esp_range(disk_path)?;
    let head = read_at(disk_path, offset, 4096.min(len as usize))?;
    if fat_size(&head).is_none_or(|n| n > len) {
        return Err(ImageError::Install {
            what: format!("the boot stage of {}", disk_path.display()),
            why: "its ESP holds no FAT file system (install one with `keel-image boot-stage \
                  install`)"
                .into(),
        });
    }
    read_boot_stage(&Fat {
        file: disk_path.to_path_buf(),
        offset,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    fn record(uki: &[u8]) -> BootStageRecord {
        BootStageRecord {
            version: "1.0.0".into(),
            kernel_release: "6.1.0-47-amd64".into(),
            cmdline: cmdline("keel.debug"),
            uki_sha256: "00".into(),
            uki_len: uki.len() as u64,
        }
    }

    fn fsck(path: &Path) -> String {
        let out = Command::new("fsck.fat")
            .arg("-n")
            .arg(path)
            .output()
            .unwrap_or_else(|e| panic!("fsck.fat: {e} (ci/install-deps installs dosfstools)"));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "fsck.fat -n: {text}");
        assert!(!text.contains("Moving") && !text.contains("Bad"), "{text}");
        text
    }

    fn fat(p: &Path) -> Fat {
        Fat {
            file: p.to_path_buf(),
            offset: 0,
        }
    }

    #[test]
    fn the_cmdline_appends_extra_words_to_the_base() {
        assert_eq!(cmdline(""), BASE_CMDLINE);
        assert_eq!(cmdline("  a=1   b "), format!("{BASE_CMDLINE} a=1 b"));
    }

    #[test]
    fn a_fat32_esp_passes_fsck_and_reads_back() {
        let d = tempfile::tempdir().unwrap();
        let uki_path = d.path().join("uki.efi");
        let uki: Vec<u8> = (0..3_000_017u32).map(|i| (i % 249) as u8).collect();
        std::fs::write(&uki_path, &uki).unwrap();
        let stage = BootStage {
            uki: uki_path,
            record: record(&uki),
        };
        let img = d.path().join("esp.img");
        make_image(&img, 64 * MIB, &stage).unwrap();
        fsck(&img);
        let bs = std::fs::read(&img).unwrap();
        assert_eq!(fat_size(&bs), Some(64 * MIB));
        assert_eq!(&bs[82..87], b"FAT32", "not FAT32");
        let (rec, back) = read_boot_stage(&fat(&img)).unwrap();
        assert_eq!(rec, stage.record);
        assert_eq!(back, uki);
        assert_eq!(
            fat(&img).list("EFI/BOOT").unwrap().unwrap(),
            vec!["BOOTX64.EFI".to_string()]
        );
    }

    #[test]
    fn replacing_the_boot_stage_keeps_one_uki_and_passes_fsck() {
        let d = tempfile::tempdir().unwrap();
        let a: Vec<u8> = vec![0xa5; 5_000_000];
        let b: Vec<u8> = vec![0x5a; 7_000_001];
        let (pa, pb) = (d.path().join("a.efi"), d.path().join("b.efi"));
        std::fs::write(&pa, &a).unwrap();
        std::fs::write(&pb, &b).unwrap();
        let img = d.path().join("esp.img");
        make_image(
            &img,
            16 * MIB,
            &BootStage {
                uki: pa,
                record: record(&a),
            },
        )
        .unwrap();
        fsck(&img);
        let mut rb = record(&b);
        rb.version = "2.0.0".into();
        write_boot_stage(&fat(&img), &pb, &rb).unwrap();
        fsck(&img);
        let (rec, back) = read_boot_stage(&fat(&img)).unwrap();
        assert_eq!(rec, rb);
        assert_eq!(back, b);
        assert_eq!(
            fat(&img).list("EFI/BOOT").unwrap().unwrap(),
            vec!["BOOTX64.EFI".to_string()]
        );
        assert_eq!(
            fat(&img).list("keel").unwrap().unwrap(),
            vec!["boot-stage.json".to_string()]
        );
    }

    #[test]
    fn a_boot_sector_that_is_not_fat_has_no_size() {
        assert_eq!(fat_size(&[0u8; 512]), None);
        assert_eq!(fat_size(&[0u8; 10]), None);
        let mut b = vec![0u8; 512];
        b[510] = 0x55;
        b[511] = 0xAA;
        assert_eq!(fat_size(&b), None);
    }
}
