//! keel-image: the offline image tool. Creates KeelOS disks and reads and changes their slot
//! flags exactly as keel-init and keel-agent do on a node.

mod build;

use clap::{Parser, Subcommand};
use keelos::block::FileDevice;
use keelos::bootctl::{self, store, Slot, DEFAULT_TRIES};
use keelos::disk::{self, LayoutSpec};
use keelos::update::matcher::Matching;
use keelos::update::sqfsmap;
use keelos::update::{self, bsdf2, bspatch, checkpoint, driver, record, zframes};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "keel-image", version, about = "KeelOS offline image tool")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Disk tables.
    #[command(subcommand)]
    Disk(DiskCmd),
    /// A/B slot flags.
    #[command(subcommand)]
    Slots(SlotsCmd),
    /// Build release artifacts and bootable disks.
    #[command(subcommand)]
    Build(build::BuildCmd),
    /// Install an image into the inactive slot and activate it (full, or a delta with the full
    /// image as fallback).
    Install {
        disk: PathBuf,
        /// The full image: uncompressed, or its zstd form (`keel-image compress`).
        #[arg(long)]
        image: PathBuf,
        /// A BSDIFF40 patch from the running slot's image; --image is the fallback.
        #[arg(long)]
        delta: Option<PathBuf>,
        /// SHA-256 of the uncompressed image.
        #[arg(long)]
        sha256: String,
        #[arg(long, default_value = "")]
        version: String,
        #[arg(long, default_value_t = DEFAULT_TRIES)]
        tries: u8,
        /// Where the resume checkpoint lives (default: DISK.checkpoint).
        #[arg(long)]
        checkpoint: Option<PathBuf>,
    },
    /// Write the resumable zstd form of an image (independent frames plus a seek table).
    Compress {
        image: PathBuf,
        out: PathBuf,
        #[arg(long, default_value_t = 19)]
        level: i32,
    },
    /// BSDIFF40 deltas between uncompressed images.
    #[command(subcommand)]
    Delta(DeltaCmd),
    /// The boot stage on a disk's ESP (not A/B; changed only by this explicit command).
    #[command(subcommand)]
    BootStage(BootStageCmd),
    /// dm-verity hash trees appended to an image, in veritysetup's format.
    #[command(subcommand)]
    Verity(VerityCmd),
}

#[derive(Subcommand)]
enum BootStageCmd {
    /// Replace the boot stage (the UKI on the ESP) of an existing KeelOS disk, offline. The new
    /// UKI is built and checked first; only the ESP is written; the new file is written under
    /// a temporary name, read back, then renamed over EFI/BOOT/BOOTX64.EFI.
    Install {
        #[arg(long)]
        disk: PathBuf,
        /// A release directory whose vmlinuz, initramfs.img and version make the boot stage.
        #[arg(long)]
        boot_stage: PathBuf,
        /// Extra kernel command-line words, after the base line.
        #[arg(long, default_value = "", allow_hyphen_values = true)]
        cmdline: String,
        /// systemd's EFI stub the UKI is made from (Debian's systemd-boot-efi).
        #[arg(long, default_value = keelos::image::uki::DEFAULT_STUB)]
        stub: PathBuf,
    },
    /// Print the disk's /keel/boot-stage.json.
    Show {
        #[arg(long)]
        disk: PathBuf,
    },
}

fn boot_stage(cmd: BootStageCmd) -> Result<(), String> {
    use keelos::image::esp;
    match cmd {
        BootStageCmd::Install {
            disk,
            boot_stage,
            cmdline,
            stub,
        } => {
            let work = tempfile::tempdir().map_err(|e| format!("a work directory: {e}"))?;
            let stage = esp::boot_stage(&boot_stage, &cmdline, &stub, work.path())
                .map_err(|e| e.to_string())?;
            esp::install_on_disk(&disk, &stage).map_err(|e| e.to_string())?;
            println!(
                "{}: boot stage {} installed (kernel {}, UKI {} bytes, sha256 {})",
                disk.display(),
                stage.record.version,
                stage.record.kernel_release,
                stage.record.uki_len,
                stage.record.uki_sha256
            );
            Ok(())
        }
        BootStageCmd::Show { disk } => {
            let (rec, uki) = esp::show_on_disk(&disk).map_err(|e| e.to_string())?;
            let sha = {
                use sha2::Digest;
                keelos::update::record::hex(&sha2::Sha256::digest(&uki))
            };
            let json = serde_json::to_string_pretty(&rec).map_err(|e| e.to_string())?;
            println!("{json}");
            if sha != rec.uki_sha256 || uki.len() as u64 != rec.uki_len {
                return Err(format!(
                    "the UKI on the ESP ({} bytes, sha256 {sha}) is not the one the record \
                     describes; reinstall it with `keel-image boot-stage install`",
                    uki.len()
                ));
            }
            Ok(())
        }
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum PatchFormat {
    Bsdf2,
    Bsdiff40,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum MatchingArg {
    Files,
    Near,
    Bsdiff,
}

#[derive(Subcommand)]
enum DeltaCmd {
    /// Make PATCH that turns OLD into NEW.
    Create {
        old: PathBuf,
        new: PathBuf,
        patch: PathBuf,
        /// bsdf2: Android's bsdiff format with brotli streams (smaller, faster to apply);
        /// bsdiff40: classic bsdiff's format (bzip2), for tools that read nothing else.
        #[arg(long, value_enum, default_value_t = PatchFormat::Bsdf2)]
        format: PatchFormat,
        /// How source matches are chosen for a bsdf2 patch. files: as near, but inside each
        /// file of a SquashFS image (uncompressed metadata, as KeelOS roots are) the file's own
        /// old version is searched first; near: among nearly-longest exact matches, one near
        /// the current alignment; bsdiff: always the longest, as bsdiff 4.3 does (for
        /// comparison). Default: files (near when the images are not such SquashFS images).
        #[arg(long, value_enum)]
        matching: Option<MatchingArg>,
        /// Brotli quality of a bsdf2 patch's streams, 0-11 (default 11).
        #[arg(long, value_parser = clap::value_parser!(u32).range(0..=11))]
        quality: Option<u32>,
    },
    /// Apply PATCH to OLD, writing NEW.
    Apply {
        old: PathBuf,
        patch: PathBuf,
        new: PathBuf,
    },
}

#[derive(Subcommand)]
enum DiskCmd {
    /// Create DISK (if absent) at the given size and write the KeelOS partition table.
    Create {
        disk: PathBuf,
        /// Disk size in bytes (suffixes K, M, G, T for KiB, MiB, GiB, TiB).
        #[arg(long, value_parser = parse_size)]
        size: u64,
        #[arg(long, value_parser = parse_size, default_value = "16M")]
        esp_size: u64,
        #[arg(long, value_parser = parse_size, default_value = "512M")]
        root_size: u64,
        /// Default: the rest of the disk.
        #[arg(long, value_parser = parse_size)]
        state_size: Option<u64>,
        /// Logical sector size of the image (512 or 4096).
        #[arg(long, default_value_t = 512)]
        sector_size: u64,
    },
}

#[derive(Subcommand)]
enum SlotsCmd {
    /// Show both slots' flags and what would boot now.
    Show {
        disk: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Activate a slot for its first boots (priority 2, N tries, not successful).
    Activate {
        disk: PathBuf,
        slot: Slot,
        #[arg(long, default_value_t = DEFAULT_TRIES)]
        tries: u8,
    },
    /// Mark a slot successful (what keel-init does once the node is healthy).
    MarkSuccessful { disk: PathBuf, slot: Slot },
    /// Roll back from the slot that would boot now to the other one, if it is bootable.
    Rollback { disk: PathBuf },
    /// Run the boot-stage choice and write its result, exactly as keel-init does.
    Boot { disk: PathBuf },
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => {
                    return Err(format!(
                        "unknown size suffix {c:?} in {s:?}: use K, M, G or T"
                    ))
                }
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size: expected bytes like 1073741824 or 1G"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

fn open_disk(path: &Path, writable: bool) -> Result<FileDevice, String> {
    disk::open_file(path, writable).map_err(|e| e.to_string())
}

#[derive(serde::Serialize)]
struct SlotJson {
    slot: Slot,
    label: &'static str,
    priority: u8,
    tries: u8,
    successful: bool,
    bootable: bool,
    state: bootctl::SlotState,
    /// From the slot's image record; null when the slot has none.
    version: Option<String>,
    length: Option<u64>,
    sha256: Option<String>,
    /// The dm-verity root hash in the record, when the image carries a tree.
    verity_root_hash: Option<String>,
}

#[derive(serde::Serialize)]
struct ShowJson {
    slots: Vec<SlotJson>,
    boot: Option<Slot>,
    /// A copy of the table that the next change will repair, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    repair: Option<String>,
}

fn show(path: &Path, json: bool) -> Result<(), String> {
    let dev = open_disk(path, false)?;
    let (layout, flags) = store::load(&dev).map_err(|e| e.to_string())?;
    let repair = match &layout.table.repair {
        disk::table::Repair::None => None,
        disk::table::Repair::Rebuild(which, why) => Some(format!(
            "{which} table copy is damaged ({why}); the next change rebuilds it"
        )),
        disk::table::Repair::Resync => {
            Some("backup table copy is stale; the next change rewrites it".to_string())
        }
    };
    let out = ShowJson {
        slots: Slot::ALL
            .iter()
            .map(|&s| {
                let f = flags.get(s);
                let rec = driver::read_record(&dev, &layout, s).ok().flatten();
                SlotJson {
                    version: rec.as_ref().map(|r| r.version.clone()),
                    length: rec.as_ref().map(|r| r.length),
                    sha256: rec.as_ref().map(|r| record::hex(&r.sha256)),
                    verity_root_hash: rec
                        .as_ref()
                        .and_then(|r| r.verity.as_ref())
                        .map(|v| record::hex(&v.root_hash)),
                    slot: s,
                    label: s.label(),
                    priority: f.priority(),
                    tries: f.tries(),
                    successful: f.successful(),
                    bootable: f.bootable(),
                    state: f.state(),
                }
            })
            .collect(),
        boot: flags.preferred(),
        repair,
    };
    if json {
        println!(
            "{}",
            serde_json::to_string(&out).map_err(|e| e.to_string())?
        );
        return Ok(());
    }
    println!(
        "SLOT  LABEL          PRIORITY  TRIES  SUCCESSFUL  BOOTABLE  STATE       VERSION     LENGTH      SHA256"
    );
    for s in &out.slots {
        println!(
            "{:<5} {:<14} {:<9} {:<6} {:<11} {:<9} {:<11} {:<11} {:<11} {}",
            s.slot.letter(),
            s.label,
            s.priority,
            s.tries,
            u8::from(s.successful),
            if s.bootable { "yes" } else { "no" },
            format!("{:?}", s.state).to_lowercase(),
            s.version.as_deref().unwrap_or("-"),
            s.length.map_or("-".to_string(), |l| l.to_string()),
            s.sha256.as_deref().unwrap_or("-"),
        );
    }
    match out.boot {
        Some(s) => println!("boot: {s}"),
        None => println!("boot: none (no slot is bootable)"),
    }
    for s in &out.slots {
        if let Some(h) = &s.verity_root_hash {
            println!("slot {}: dm-verity root hash {h}", s.slot.letter());
        }
    }
    if let Some(r) = out.repair {
        println!("note: {r}");
    }
    Ok(())
}

fn change(
    path: &Path,
    f: impl FnOnce(bootctl::SlotFlags) -> Result<bootctl::SlotFlags, bootctl::FlagError>,
) -> Result<bootctl::SlotFlags, String> {
    let mut dev = open_disk(path, true)?;
    let (_, flags) = store::update(&mut dev, f).map_err(|e| e.to_string())?;
    Ok(flags)
}

fn install(
    path: &Path,
    image: &Path,
    delta: Option<&Path>,
    sha256: String,
    version: String,
    tries: u8,
    checkpoint: Option<PathBuf>,
) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    let open =
        |p: &Path| std::fs::File::open(p).map_err(|e| format!("cannot open {}: {e}", p.display()));
    let full = open(image)?;
    let size = full.metadata().map_err(|e| e.to_string())?.len();
    let mut head = [0u8; 4];
    let n = full.read_at(&mut head, 0).map_err(|e| e.to_string())?;
    let image_len = if zframes::is_zstd(&head[..n]) {
        let tail_len = size.min(1 << 20);
        let mut tail = vec![0u8; tail_len as usize];
        full.read_exact_at(&mut tail, size - tail_len)
            .map_err(|e| e.to_string())?;
        zframes::seek_table_size(&tail)
    } else {
        Some(size)
    };
    let patch = delta.map(open).transpose()?;
    let mut dev = open_disk(path, true)?;
    let (_, flags) = store::load(&dev).map_err(|e| e.to_string())?;
    let req = driver::Request {
        sha256,
        version,
        tries,
        full: update::FullImage {
            identity: format!("file:{}:{size}", image.display()),
            fetch_size: Some(size),
            image_len,
        },
        delta: delta.map(|p| format!("file:{}", p.display())),
        delta_expect: None,
        checkpoint_every: update::DEFAULT_CHECKPOINT_EVERY,
    };
    let (layout, plan) =
        driver::plan(&dev, driver::running_slot(flags), req).map_err(|e| e.to_string())?;
    let mut store_cp = checkpoint::FileStore::new(
        checkpoint.unwrap_or_else(|| PathBuf::from(format!("{}.checkpoint", path.display()))),
    );
    let mut inputs = driver::FileInputs { full, patch };
    let mut last = None;
    let report = driver::run(
        &mut dev,
        &layout,
        plan,
        &mut inputs,
        &mut store_cp,
        &mut |p| {
            if last != Some(p.phase) {
                eprintln!("{:?}...", p.phase);
                last = Some(p.phase);
            }
        },
    )
    .map_err(|e| e.to_string())?;
    println!(
        "staged {} in slot {} ({} bytes, sha256 {}){}",
        if report.version.is_empty() {
            "image"
        } else {
            &report.version
        },
        report.slot,
        report.image_len,
        report.sha256,
        match &report.resume {
            update::Resume::From(n) => format!(", resumed at byte {n}"),
            _ => String::new(),
        }
    );
    if delta.is_some() {
        match &report.fallback_reason {
            Some(r) => println!("delta not used, fell back to the full image: {r}"),
            None => println!("delta used: {} bytes saved", report.bytes_saved),
        }
    }
    Ok(())
}

fn delta_apply(old: &Path, patch: &Path, new: &Path) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    let old_f =
        std::fs::File::open(old).map_err(|e| format!("cannot open {}: {e}", old.display()))?;
    let old_len = old_f.metadata().map_err(|e| e.to_string())?.len();
    let patch_bytes =
        std::fs::read(patch).map_err(|e| format!("cannot read {}: {e}", patch.display()))?;
    let mut p = bspatch::Patcher::new(patch_bytes, old_len, u64::MAX)
        .map_err(|e| format!("{}: {e}", patch.display()))?;
    let tmp = new.with_extension("partial");
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(&tmp).map_err(|e| format!("cannot create {}: {e}", tmp.display()))?,
    );
    loop {
        match p.step().map_err(|e| format!("{}: {e}", patch.display()))? {
            bspatch::Step::NeedSource { offset, len } => {
                let mut b = vec![0u8; len];
                old_f
                    .read_exact_at(&mut b, offset)
                    .map_err(|e| format!("read {}: {e}", old.display()))?;
                p.source(b);
            }
            bspatch::Step::Output(b) => out.write_all(&b).map_err(|e| e.to_string())?,
            bspatch::Step::Done => break,
        }
    }
    out.into_inner()
        .map_err(|e| e.to_string())?
        .sync_all()
        .map_err(|e| e.to_string())?;
    std::fs::rename(&tmp, new).map_err(|e| e.to_string())
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.cmd {
        Cmd::Install {
            disk,
            image,
            delta,
            sha256,
            version,
            tries,
            checkpoint,
        } => install(
            &disk,
            &image,
            delta.as_deref(),
            sha256,
            version,
            tries,
            checkpoint,
        ),
        Cmd::Compress { image, out, level } => {
            let input = std::fs::File::open(&image)
                .map_err(|e| format!("cannot open {}: {e}", image.display()))?;
            let output = std::fs::File::create(&out)
                .map_err(|e| format!("cannot create {}: {e}", out.display()))?;
            let mut w = std::io::BufWriter::new(output);
            let n = zframes::compress(
                std::io::BufReader::new(input),
                &mut w,
                level,
                zframes::FRAME_SIZE,
            )
            .map_err(|e| e.to_string())?;
            println!("{} bytes", n);
            Ok(())
        }
        Cmd::Delta(DeltaCmd::Create {
            old,
            new,
            patch,
            format,
            matching,
            quality,
        }) => {
            let read = |p: &Path| {
                std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
            };
            let (o, n) = (read(&old)?, read(&new)?);
            let f = std::fs::File::create(&patch)
                .map_err(|e| format!("cannot create {}: {e}", patch.display()))?;
            let format = match (format, matching) {
                (PatchFormat::Bsdf2, m) => {
                    let (matching, per_file) = match m.unwrap_or(MatchingArg::Files) {
                        MatchingArg::Files => (Matching::Near, true),
                        MatchingArg::Near => (Matching::Near, false),
                        MatchingArg::Bsdiff => (Matching::Bsdiff, false),
                    };
                    if per_file {
                        match sqfsmap::image_pairs(&o, &n) {
                            Ok(p) => eprintln!("per-file matching: {} file ranges paired", p.len()),
                            Err(e) => eprintln!(
                                "no per-file matching ({e}); matching over the whole image"
                            ),
                        }
                    }
                    bsdf2::CreateFormat::Bsdf2Brotli(bsdf2::Bsdf2Params {
                        matching,
                        per_file,
                        quality: quality.unwrap_or(bsdf2::BROTLI_QUALITY),
                    })
                }
                (PatchFormat::Bsdiff40, None) if quality.is_none() => bsdf2::CreateFormat::Bsdiff40,
                (PatchFormat::Bsdiff40, _) => {
                    return Err(
                        "--matching and --quality apply to bsdf2 patches; bsdiff40 patches are \
                         made with qbsdiff's matching and bzip2 -9 (leave them out)"
                            .to_string(),
                    )
                }
            };
            bsdf2::create(&o, &n, format, std::io::BufWriter::new(f))
                .map_err(|e| format!("cannot write {}: {e}", patch.display()))?;
            Ok(())
        }
        Cmd::Delta(DeltaCmd::Apply { old, patch, new }) => delta_apply(&old, &patch, &new),
        Cmd::Disk(DiskCmd::Create {
            disk: path,
            size,
            esp_size,
            root_size,
            state_size,
            sector_size,
        }) => {
            if size % sector_size != 0 {
                return Err(format!(
                    "--size {size} is not a multiple of the {sector_size}-byte sector size"
                ));
            }
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
            let len = file.metadata().map_err(|e| e.to_string())?.len();
            if len < size {
                file.set_len(size)
                    .map_err(|e| format!("cannot size {}: {e}", path.display()))?;
            } else if len > size {
                return Err(format!(
                    "{} is already {len} bytes, larger than --size {size}; refusing to shrink it",
                    path.display()
                ));
            }
            drop(file);
            let mut dev = FileDevice::open(&path, true)
                .map_err(|e| e.to_string())?
                .with_sector_size(sector_size);
            let spec = LayoutSpec {
                esp_size,
                root_size,
                state_size,
            };
            disk::create(&mut dev, spec).map_err(|e| e.to_string())?;
            let l = disk::open(&dev).map_err(|e| e.to_string())?;
            for p in [&l.esp, &l.root_a, &l.root_b, &l.state] {
                println!(
                    "{:<13} offset {:>12}  size {:>12}",
                    p.label, p.offset, p.len
                );
            }
            Ok(())
        }
        Cmd::Build(b) => build::run(b),
        Cmd::BootStage(c) => boot_stage(c),
        Cmd::Verity(c) => verity_cmd(c),
        Cmd::Slots(SlotsCmd::Show { disk, json }) => show(&disk, json),
        Cmd::Slots(SlotsCmd::Activate { disk, slot, tries }) => {
            let f = change(&disk, |f| bootctl::activate(f, slot, None, tries))?;
            println!("slot {slot} activated: {}", f.get(slot));
            Ok(())
        }
        Cmd::Slots(SlotsCmd::MarkSuccessful { disk, slot }) => {
            let f = change(&disk, |f| bootctl::mark_successful(f, slot))?;
            println!("slot {slot} marked successful: {}", f.get(slot));
            Ok(())
        }
        Cmd::Slots(SlotsCmd::Rollback { disk }) => {
            let mut from = None;
            let f = change(&disk, |f| {
                let running = f
                    .preferred()
                    .ok_or(bootctl::FlagError::NoBootableSlot { a: f.a, b: f.b })?;
                from = Some(running);
                bootctl::rollback(f, running)
            })?;
            if let Some(from) = from {
                println!("rolled back from slot {from} to slot {}", from.other());
            }
            println!("boot: {}", f.preferred().map_or("none", Slot::letter));
            Ok(())
        }
        Cmd::Slots(SlotsCmd::Boot { disk }) => {
            let mut dev = open_disk(&disk, true)?;
            let (_, choice) = store::boot(&mut dev).map_err(|e| e.to_string())?;
            println!("{}", choice.slot);
            Ok(())
        }
    }
}

#[derive(Subcommand)]
enum VerityCmd {
    /// Append a superblock and hash tree to IMAGE at the next 4096-byte boundary (zero padding
    /// in between is part of the data), as `veritysetup format --hash-offset=OFF IMAGE IMAGE`
    /// would; prints the root hash.
    Format {
        image: PathBuf,
        /// Salt in hex, `-` for none (default: 32 random bytes).
        #[arg(long)]
        salt: Option<String>,
        /// UUID stored in the superblock (default: a random one).
        #[arg(long)]
        uuid: Option<uuid::Uuid>,
        #[arg(long)]
        json: bool,
    },
    /// Check every data block of IMAGE and every block of its appended tree against a root
    /// hash; fails naming the first bad block.
    Verify {
        image: PathBuf,
        #[arg(long)]
        root_hash: String,
        /// Byte offset of the superblock (default: found from the size of a file made by
        /// `verity format`; give it for a slot partition, whose size is not the image's).
        #[arg(long)]
        hash_offset: Option<u64>,
    },
}

fn verity_cmd(cmd: VerityCmd) -> Result<(), String> {
    use keelos::image::verity_file;
    use keelos::verity::{RootHash, Salt};
    use std::io::Read;

    match cmd {
        VerityCmd::Format {
            image,
            salt,
            uuid,
            json,
        } => {
            let salt = match salt {
                Some(hex) => Salt::from_hex(&hex).map_err(|e| e.to_string())?,
                None => {
                    let mut b = [0u8; 32];
                    std::fs::File::open("/dev/urandom")
                        .and_then(|mut f| f.read_exact(&mut b))
                        .map_err(|e| format!("cannot read a random salt: {e}"))?;
                    Salt::new(&b).map_err(|e| e.to_string())?
                }
            };
            let uuid = uuid.unwrap_or_else(uuid::Uuid::new_v4);
            let f = verity_file::format(&image, salt, uuid)?;
            let report = serde_json::json!({
                "root_hash": f.root_hash.to_string(),
                "salt": f.salt.to_string(),
                "uuid": f.uuid.to_string(),
                "data_size": f.data_size,
                "hash_offset": f.hash_offset,
                "data_blocks": f.data_blocks,
                "hash_blocks": f.hash_blocks,
                "image_size": f.image_size,
            });
            if json {
                println!("{report}");
            } else if let serde_json::Value::Object(m) = report {
                for (k, v) in m {
                    println!(
                        "{k}: {}",
                        v.as_str().map_or_else(|| v.to_string(), str::to_string)
                    );
                }
            }
            Ok(())
        }
        VerityCmd::Verify {
            image,
            root_hash,
            hash_offset,
        } => {
            let root = RootHash::from_hex(&root_hash).map_err(|e| e.to_string())?;
            let blocks = verity_file::verify(&image, &root, hash_offset)?;
            println!("ok: {blocks} data blocks and the hash tree match root hash {root}");
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keel-image: {e}");
            ExitCode::FAILURE
        }
    }
}
