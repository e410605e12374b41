//! `keel-image build`: release artifacts and bootable disks. Argument parsing and wiring only;
//! the pipeline is `keelos::image`.

use clap::{Args, Subcommand};
use keelos::disk::LayoutSpec;
use keelos::image::debian::PackageCache;
use keelos::image::release::{self, Broken, ReleaseInputs};
use keelos::image::{diskimg, esp, oci, uki, ImageError};
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum BuildCmd {
    /// Build a release into OUT: vmlinuz, initramfs.img, root.img (uncompressed SquashFS),
    /// root.img.sha256, root.img.zst, build.json (the build record), release.json (the
    /// manifest nodes check) and, with --sign, release.json.minisig.
    Release(ReleaseArgs),
    /// Create a bootable disk from a release: the boot stage (a UKI) on the ESP, its root image
    /// in slot A (active, successful), STATE with the node's PKI and configuration.
    Disk(DiskArgs),
    /// Write the pod sandbox ("pause") image as an OCI image layout into OUT (absent or empty):
    /// one uncompressed layer holding /pause, a static program that sleeps until SIGTERM or
    /// SIGINT and then exits 0. Reproducible; prints the manifest digest.
    PauseImage(PauseImageArgs),
}

#[derive(Args)]
pub struct PauseImageArgs {
    /// The OCI image layout directory to create.
    #[arg(long)]
    out: PathBuf,
    /// The tag the layout's index.json names the image by.
    #[arg(long, default_value = oci::PAUSE_TAG)]
    tag: String,
}

#[derive(Args)]
pub struct ReleaseArgs {
    /// The version written to /etc/os-release.
    #[arg(long)]
    version: String,
    #[arg(long)]
    out: PathBuf,
    /// keel-init binary (default: beside this keel-image).
    #[arg(long)]
    init: Option<PathBuf>,
    /// keel-agent binary (default: beside this keel-image).
    #[arg(long)]
    agent: Option<PathBuf>,
    /// A kubelet binary to carry (none is in Debian's archive).
    #[arg(long)]
    kubelet: Option<PathBuf>,
    /// The repository's image/ directory (versions.env, modules.list, rootfs.list).
    #[arg(long, default_value = "image")]
    image_dir: PathBuf,
    /// Where downloaded Debian packages are kept between builds [env: KEEL_CACHE].
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Tests only: build a deliberately broken release.
    #[arg(long, value_enum)]
    broken: Option<Broken>,
    /// Build with this kernel package instead of the one image/versions.env pins
    /// (e.g. linux-image-6.1.0-48-amd64=6.1.172-1); its kernel release is read from the package.
    #[arg(long, value_name = "NAME=VERSION")]
    kernel_package: Option<release::KernelPackage>,
    /// zstd level of root.img.zst.
    #[arg(long, default_value_t = 19)]
    zstd_level: i32,
    /// A previous release directory: also write the delta (BSDF2) from it.
    #[arg(long)]
    delta_from: Option<PathBuf>,
    /// Brotli quality (0-11) of the delta's streams: 11 makes the smallest patch, lower
    /// qualities make it faster.
    #[arg(long, default_value_t = keelos::update::bsdf2::BROTLI_QUALITY,
          value_parser = clap::value_parser!(u32).range(0..=11))]
    delta_quality: u32,
    /// The manifest's security version: nodes refuse a release with a lower one than they run
    /// (unless told --allow-downgrade). Raise it when a release fixes a vulnerability.
    #[arg(long, default_value_t = 0)]
    security_version: u64,
    /// A minisign public key (.pub, from `minisign -G`) the image trusts to sign its updates;
    /// repeat it (two or more in production, so a key can be rotated by an update). None: a
    /// development image, which takes unsigned releases.
    #[arg(long = "trust", value_name = "PUBKEY_FILE")]
    trust: Vec<PathBuf>,
    /// Sign release.json with this unencrypted minisign secret key (`minisign -G -W`); its
    /// public key must be one of --trust. Without it, sign release.json afterwards with
    /// `minisign -S -s KEY -m release.json`.
    #[arg(long = "sign", value_name = "SECRET_KEY_FILE")]
    sign: Option<PathBuf>,
}

#[derive(Args)]
pub struct DiskArgs {
    /// A release directory made by `keel-image build release`.
    #[arg(long)]
    release: PathBuf,
    /// The disk image to create (refused if it exists).
    #[arg(long)]
    out: PathBuf,
    /// Disk size (sparse file); suffixes K, M, G.
    #[arg(long, value_parser = crate::parse_size, default_value = "2G")]
    size: u64,
    #[arg(long, value_parser = crate::parse_size, default_value = "384M")]
    root_size: u64,
    #[arg(long, value_parser = crate::parse_size, default_value = "64M")]
    esp_size: u64,
    /// A release directory whose vmlinuz, initramfs.img and version make the boot stage (the
    /// UKI on the ESP); default: the --release directory.
    #[arg(long)]
    boot_stage: Option<PathBuf>,
    /// Extra kernel command-line words for the boot stage, after the base line.
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    cmdline: String,
    /// systemd's EFI stub the UKI is made from (Debian's systemd-boot-efi).
    #[arg(long, default_value = uki::DEFAULT_STUB)]
    stub: PathBuf,
    /// A directory made by `osctl gen pki` (its ca.crt, agent.crt, agent.key go to the node).
    #[arg(long)]
    pki: Option<PathBuf>,
    /// The node configuration (JSON), stored as /state/config/node.json.
    #[arg(long)]
    config: Option<PathBuf>,
}

fn beside_me(name: &str) -> Result<PathBuf, String> {
    let me = std::env::current_exe().map_err(|e| format!("cannot find keel-image's path: {e}"))?;
    Ok(me.with_file_name(name))
}

pub fn default_cache() -> PathBuf {
    std::env::var_os("KEEL_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/keelos"))
}

fn err(e: ImageError) -> String {
    e.to_string()
}

pub fn run(cmd: BuildCmd) -> Result<(), String> {
    match cmd {
        BuildCmd::PauseImage(a) => {
            let image = oci::pause_image(&a.tag).map_err(|e| e.to_string())?;
            oci::write_layout(&image, &a.out).map_err(|e| e.to_string())?;
            println!("{}", image.manifest.digest);
            Ok(())
        }
        BuildCmd::Release(a) => {
            let trust = release::trusted_keys_from_files(&a.trust).map_err(|e| e.to_string())?;
            let signer = a
                .sign
                .as_deref()
                .map(release::ReleaseSigner::from_file)
                .transpose()
                .map_err(|e| e.to_string())?;
            release::check_signing(&trust, signer.as_ref()).map_err(|e| e.to_string())?;
            if trust.len() == 1 {
                eprintln!(
                    "note: the image trusts one key only; a second (spare) --trust key lets a \
                     later release rotate keys"
                );
            }
            let inputs = ReleaseInputs {
                image_dir: a.image_dir,
                cache: PackageCache::new(a.cache.unwrap_or_else(default_cache)),
                version: a.version,
                init: match a.init {
                    Some(p) => p,
                    None => beside_me("keel-init")?,
                },
                agent: match a.agent {
                    Some(p) => p,
                    None => beside_me("keel-agent")?,
                },
                kubelet: a.kubelet,
                broken: a.broken,
                kernel_package: a.kernel_package,
                zstd_level: a.zstd_level,
                delta_quality: a.delta_quality,
                delta_from: a.delta_from,
                security_version: a.security_version,
                trust,
                signer,
            };
            let r = release::build(&inputs, &a.out).map_err(err)?;
            println!(
                "release {} (kernel {}, {} {}){}",
                r.version,
                r.kernel_release,
                r.kernel_package,
                r.kernel_version,
                r.broken
                    .map(|b| format!(", deliberately broken: {b:?}"))
                    .unwrap_or_default()
            );
            println!("  {:<40} {:>12} bytes", r.root.display(), r.root_len);
            println!(
                "  {:<40} {:>12} bytes",
                r.initramfs.display(),
                r.initramfs_len
            );
            println!(
                "  {:<40} {:>12} bytes",
                r.compressed.display(),
                r.compressed_len
            );
            if let Some(d) = &r.delta {
                println!(
                    "  {:<40} {:>12} bytes (from {}; {:.1}% of the compressed image)",
                    d.path.display(),
                    d.len,
                    d.from_version,
                    100.0 * d.len as f64 / r.compressed_len.max(1) as f64
                );
            }
            println!("  sha256 {}", r.root_sha256);
            println!(
                "  {} security version {}, {}; image trusts {}",
                release::MANIFEST_FILE,
                r.security_version,
                match &r.signed_by {
                    Some(k) => format!("signed by {k} ({})", release::SIGNATURE_FILE),
                    None => "unsigned".to_string(),
                },
                if r.trusted_keys.is_empty() {
                    "no key (development image)".to_string()
                } else {
                    r.trusted_keys.join(", ")
                }
            );
            println!("  modules: {}", r.modules.join(" "));
            Ok(())
        }
        BuildCmd::Disk(a) => {
            let root = a.release.join(release::ROOT_FILE);
            let mf = a.release.join(release::BUILD_RECORD_FILE);
            let manifest: serde_json::Value = std::fs::read(&mf)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
                .map_err(|e| {
                    format!(
                        "{} is not a release made by `keel-image build release`: {e}",
                        mf.display()
                    )
                })?;
            let version = manifest["version"].as_str().unwrap_or_default().to_string();
            let work = tempfile::tempdir().map_err(|e| format!("a work directory: {e}"))?;
            let stage_dir = a.boot_stage.unwrap_or_else(|| a.release.clone());
            let stage =
                esp::boot_stage(&stage_dir, &a.cmdline, &a.stub, work.path()).map_err(err)?;
            let stage_line = format!(
                "boot stage {} (kernel {}, UKI {} bytes), cmdline: {}",
                stage.record.version,
                stage.record.kernel_release,
                stage.record.uki_len,
                stage.record.cmdline
            );
            let inputs = diskimg::DiskInputs {
                root_image: root,
                version,
                size: a.size,
                layout: LayoutSpec {
                    esp_size: a.esp_size,
                    root_size: a.root_size,
                    state_size: None,
                },
                pki: a.pki,
                config: a.config,
                boot_stage: Some(stage),
            };
            diskimg::build(&inputs, &a.out).map_err(err)?;
            println!(
                "{}: KeelOS disk, slot A holds {} (active, successful)",
                a.out.display(),
                Path::new(&a.release).display()
            );
            println!("  {stage_line}");
            Ok(())
        }
    }
}
