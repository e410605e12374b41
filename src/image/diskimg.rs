//! A bootable KeelOS disk image: the GPT layout (via [`crate::disk::create`]), a release's root
//! image in slot A, an ext4 STATE holding the node's PKI and configuration, and slot A active
//! and marked successful (via [`crate::bootctl::store`]), and the boot stage on the ESP
//! ([`super::esp`]). The root image is installed by the
//! update engine ([`crate::update::driver`]), so slot A carries the same image record (version,
//! length, SHA-256) as a slot an update wrote.
//!
//! Writes only the disk image file it creates (refusing to overwrite an existing one) and
//! temporary STATE and ESP files beside it.

use super::tree::Tree;
use super::ImageError;
use crate::block::{BlockDevice, FileDevice};
use crate::bootctl::{self, store, Slot, DEFAULT_TRIES};
use crate::disk::{self, LayoutSpec};
use crate::update::{self, checkpoint, driver};
use std::path::{Path, PathBuf};
use std::process::Command;

/// What goes on a new disk.
#[derive(Debug, Clone)]
pub struct DiskInputs {
    /// The uncompressed root image for slot A.
    pub root_image: PathBuf,
    /// Its version, kept in slot A's image record.
    pub version: String,
    /// Disk size in bytes (the file is sparse).
    pub size: u64,
    pub layout: LayoutSpec,
    /// A directory made by `osctl gen pki`: its ca.crt, agent.crt and agent.key go to
    /// STATE's /pki (never the CA's key or the client keys).
    pub pki: Option<PathBuf>,
    /// The node configuration, stored as STATE's /config/node.json.
    pub config: Option<PathBuf>,
    /// The boot stage for the ESP (a FAT32 file system with the UKI); `None` leaves the ESP
    /// empty.
    pub boot_stage: Option<super::esp::BootStage>,
}

/// The files of the agent's PKI that a node holds.
pub const NODE_PKI_FILES: [&str; 3] = ["ca.crt", "agent.crt", "agent.key"];

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ImageError {
    let what = what.into();
    move |e| ImageError::Io { what, source: e }
}

/// The STATE tree of a new node.
pub fn state_tree(pki: Option<&Path>, config: Option<&Path>) -> Result<Tree, ImageError> {
    let mut t = Tree::new();
    for d in ["config", "pki", "update", "log", "var"] {
        t.dir(d)?;
    }
    if let Some(p) = pki {
        for f in NODE_PKI_FILES {
            let src = p.join(f);
            if !src.is_file() {
                return Err(ImageError::MissingInput {
                    what: format!("{f} of the node's PKI (make it with `osctl gen pki --out DIR`)"),
                    path: src.display().to_string(),
                });
            }
            let mode = if f.ends_with(".key") { 0o600 } else { 0o644 };
            t.host_file(&format!("pki/{f}"), src, mode)?;
        }
    }
    if let Some(c) = config {
        if !c.is_file() {
            return Err(ImageError::MissingInput {
                what: "the node configuration".into(),
                path: c.display().to_string(),
            });
        }
        t.host_file("config/node.json", c, 0o600)?;
    }
    Ok(t)
}

/// Make an ext4 file system of `len` bytes holding `t`, at `file`.
pub fn mkfs_state(t: &Tree, file: &Path, len: u64) -> Result<(), ImageError> {
    let stage = tempfile::Builder::new()
        .prefix(".keel-state-")
        .tempdir_in(file.parent().unwrap_or(Path::new(".")))
        .map_err(io("a staging directory for STATE"))?;
    t.materialize(stage.path())?;
    let f = std::fs::File::create(file).map_err(io(file.display().to_string()))?;
    f.set_len(len).map_err(io(file.display().to_string()))?;
    drop(f);
    let out = Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-L",
            "MATIC_STATE",
            "-E",
            "root_owner=0:0",
            "-d",
        ])
        .arg(stage.path())
        .arg(file)
        .output()
        .map_err(|e| ImageError::Spawn {
            tool: "mkfs.ext4",
            source: e,
        })?;
    if !out.status.success() {
        return Err(ImageError::Tool {
            tool: "mkfs.ext4",
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Copy `src` into `dst` at `at`, skipping all-zero chunks (the target is fresh and sparse).
fn copy_into<D: BlockDevice>(
    dst: &mut D,
    at: u64,
    src: &Path,
    room: u64,
    what: &str,
) -> Result<u64, ImageError> {
    use std::io::Read;
    let len = std::fs::metadata(src)
        .map_err(io(src.display().to_string()))?
        .len();
    if len > room {
        return Err(ImageError::TooLarge {
            what: what.to_string(),
            len,
            room,
        });
    }
    let mut f = std::fs::File::open(src).map_err(io(src.display().to_string()))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io(src.display().to_string()))?;
        if n == 0 {
            break;
        }
        if buf[..n].iter().any(|&b| b != 0) {
            dst.write_at(at + off, &buf[..n])?;
        }
        off += n as u64;
    }
    Ok(len)
}

/// Install the root image into slot A with the update engine, exactly as an update would be
/// installed: written, read back and checked against its SHA-256, its slot record (version,
/// length, SHA-256) written, the slot activated.
fn install_root(dev: &mut FileDevice, image: &Path, version: &str) -> Result<(), ImageError> {
    let (sha256, len) = super::release::sha256_file(image)?;
    let full = std::fs::File::open(image).map_err(io(image.display().to_string()))?;
    let req = driver::Request {
        sha256,
        version: version.to_string(),
        tries: DEFAULT_TRIES,
        full: update::FullImage {
            identity: format!("file:{}:{len}", image.display()),
            fetch_size: Some(len),
            image_len: Some(len),
        },
        delta: None,
        delta_expect: None,
        checkpoint_every: update::DEFAULT_CHECKPOINT_EVERY,
    };
    let install_err = |e: update::engine::InstallError| ImageError::Install {
        what: format!("{} into slot A", image.display()),
        why: e.to_string(),
    };
    let (layout, plan) = driver::plan(&*dev, None, req).map_err(install_err)?;
    if plan.target != Slot::A {
        return Err(ImageError::Install {
            what: image.display().to_string(),
            why: format!("the engine chose slot {} on a new disk", plan.target),
        });
    }
    let mut cp = checkpoint::MemStore::default();
    let mut inputs = driver::FileInputs { full, patch: None };
    driver::run(dev, &layout, plan, &mut inputs, &mut cp, &mut |_| {}).map_err(install_err)?;
    Ok(())
}

/// Create `out` (which must not exist) as a bootable KeelOS disk.
pub fn build(inputs: &DiskInputs, out: &Path) -> Result<(), ImageError> {
    if out.exists() {
        return Err(ImageError::Exists(out.display().to_string()));
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(out)
        .map_err(io(out.display().to_string()))?;
    f.set_len(inputs.size)
        .map_err(io(out.display().to_string()))?;
    drop(f);
    let result = (|| {
        let mut dev = FileDevice::open(out, true)?;
        disk::create(&mut dev, inputs.layout)?;
        install_root(&mut dev, &inputs.root_image, &inputs.version)?;
        let layout = disk::open(&dev)?;
        if let Some(stage) = &inputs.boot_stage {
            let esp_file = out.with_extension("esp.tmp");
            let r = super::esp::make_image(&esp_file, layout.esp.len, stage).and_then(|()| {
                copy_into(
                    &mut dev,
                    layout.esp.offset,
                    &esp_file,
                    layout.esp.len,
                    "the ESP",
                )
            });
            let _ = std::fs::remove_file(&esp_file);
            r?;
        }
        let state_file = out.with_extension("state.tmp");
        let st = state_tree(inputs.pki.as_deref(), inputs.config.as_deref())?;
        let r = mkfs_state(&st, &state_file, layout.state.len).and_then(|()| {
            copy_into(
                &mut dev,
                layout.state.offset,
                &state_file,
                layout.state.len,
                "STATE",
            )
        });
        let _ = std::fs::remove_file(&state_file);
        r?;
        dev.flush()?;
        // A factory image is known good: slot A starts successful, as after its first boot.
        store::update(&mut dev, |f| bootctl::mark_successful(f, Slot::A))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(out);
    }
    result
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::disk::MIB;

    #[test]
    fn a_disk_boots_slot_a_with_the_image_and_state() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root.img");
        let image: Vec<u8> = (0..3 * MIB + 512).map(|i| (i % 251) as u8 + 1).collect();
        std::fs::write(&root, &image).unwrap();
        let pki = d.path().join("pki");
        std::fs::create_dir(&pki).unwrap();
        for f in NODE_PKI_FILES.iter().chain(&["ca.key", "admin.key"]) {
            std::fs::write(pki.join(f), format!("pem of {f}")).unwrap();
        }
        let cfg = d.path().join("node.json");
        std::fs::write(&cfg, "{}").unwrap();
        let out = d.path().join("disk.img");
        let inputs = DiskInputs {
            root_image: root.clone(),
            version: "1.2.3".into(),
            size: 64 * MIB,
            layout: LayoutSpec {
                esp_size: MIB,
                root_size: 8 * MIB,
                state_size: None,
            },
            pki: Some(pki),
            config: Some(cfg),
            boot_stage: None,
        };
        build(&inputs, &out).unwrap();
        let dev = FileDevice::open(&out, false).unwrap();
        let (layout, flags) = store::load(&dev).unwrap();
        assert_eq!(flags.preferred(), Some(Slot::A));
        assert!(flags.a.successful());
        assert!(!flags.b.bootable());
        let got = crate::block::read_vec(&dev, layout.root_a.offset, image.len()).unwrap();
        assert_eq!(got, image);
        let rec = driver::read_record(&dev, &layout, Slot::A)
            .unwrap()
            .unwrap();
        assert_eq!(rec.version, "1.2.3");
        assert_eq!(rec.length, image.len() as u64);
        assert_eq!(
            update::record::hex(&rec.sha256),
            crate::image::release::sha256_file(&root).unwrap().0
        );
        // STATE is ext4 with the node's files and no CA key
        let state = d.path().join("state.ext4");
        let bytes =
            crate::block::read_vec(&dev, layout.state.offset, layout.state.len as usize).unwrap();
        std::fs::write(&state, bytes).unwrap();
        let ls = Command::new("debugfs")
            .args(["-R", "ls -l /pki"])
            .arg(&state)
            .output()
            .unwrap();
        let ls = String::from_utf8_lossy(&ls.stdout);
        assert!(ls.contains("agent.key") && ls.contains("ca.crt"), "{ls}");
        assert!(!ls.contains("ca.key") && !ls.contains("admin.key"), "{ls}");
        let cat = Command::new("debugfs")
            .args(["-R", "cat /config/node.json"])
            .arg(&state)
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&cat.stdout), "{}");
        // never overwrites
        let e = build(&inputs, &out).unwrap_err();
        assert!(e.to_string().contains("exists"), "{e}");
    }

    #[test]
    fn an_image_larger_than_the_slot_is_refused_and_nothing_is_left() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root.img");
        std::fs::write(&root, vec![1u8; (2 * MIB) as usize]).unwrap();
        let out = d.path().join("disk.img");
        let e = build(
            &DiskInputs {
                root_image: root,
                version: "1.2.3".into(),
                size: 32 * MIB,
                layout: LayoutSpec {
                    esp_size: MIB,
                    root_size: MIB,
                    state_size: None,
                },
                pki: None,
                config: None,
                boot_stage: None,
            },
            &out,
        )
        .unwrap_err();
        assert!(matches!(e, ImageError::Install { .. }), "{e}");
        eprintln!("{e}");
        assert!(!out.exists());
    }
}
