//! OCI images of a single static program, written as an OCI image layout directory
//! (`oci-layout`, `index.json`, `blobs/sha256/<hex>`; opencontainers/image-spec): the pod sandbox
//! ("pause") image containerd needs, and test images.
//!
//! The image is one uncompressed tar layer holding the program (mode 0755, owner 0:0, mtime 0),
//! an image config whose entrypoint is that program, a manifest and an index naming it by tag.
//! Identical input gives byte-identical blobs, hence the same digests. [`single_binary_image`] is
//! pure; only [`write_layout`] touches the file system, and only below the directory it is given.

use sha2::{Digest, Sha256};
use std::path::Path;

pub const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
/// The index annotation that names a manifest by tag.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// Where the pause program sits in the pause image (as in registry.k8s.io/pause).
pub const PAUSE_PATH: &str = "/pause";
/// The default pause image tag, the version of registry.k8s.io/pause recent Kubernetes
/// releases name (the sandbox image setting must name the same tag).
pub const PAUSE_TAG: &str = "3.10.1";

/// Building or writing an OCI image failed.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum OciError {
    /// The program path cannot be stored in a ustar header.
    #[error(
        "{0:?} is not a usable path in the image: it must be absolute, without `.`, `..` or \
         empty components, ASCII, and at most 100 bytes per name (ustar)"
    )]
    BadPath(String),
    /// The tag is not an OCI tag.
    #[error("{0:?} is not an image tag: 1 to 128 of [A-Za-z0-9_.-], not starting with . or -")]
    BadTag(String),
    /// The program is too large for a ustar size field.
    #[error("the program is {0} bytes; a ustar entry holds at most 8 GiB")]
    TooLarge(u64),
    #[error("{path} is not empty; remove it or choose another output directory")]
    NotEmpty { path: String },
    #[error("{what} {path}: {why}")]
    Io {
        what: &'static str,
        path: String,
        why: String,
    },
}

/// One content-addressed blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    pub media_type: &'static str,
    /// `sha256:<hex>`
    pub digest: String,
    pub bytes: Vec<u8>,
}

impl Blob {
    pub fn new(media_type: &'static str, bytes: Vec<u8>) -> Blob {
        Blob {
            media_type,
            digest: sha256_digest(&bytes),
            bytes,
        }
    }

    /// The hex part of the digest: the blob's file name under `blobs/sha256/`.
    pub fn hex(&self) -> &str {
        self.digest.trim_start_matches("sha256:")
    }

    fn descriptor(&self) -> serde_json::Value {
        serde_json::json!({
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.bytes.len(),
        })
    }
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!(
        "sha256:{}",
        crate::update::record::hex(&Sha256::digest(bytes))
    )
}

/// A complete single-layer image and the index that names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciImage {
    pub tag: String,
    /// The uncompressed tar; its digest is also the config's diff_id.
    pub layer: Blob,
    pub config: Blob,
    pub manifest: Blob,
    /// The bytes of `index.json`.
    pub index: Vec<u8>,
}

impl OciImage {
    /// The blobs, as stored under `blobs/sha256/`.
    pub fn blobs(&self) -> [&Blob; 3] {
        [&self.layer, &self.config, &self.manifest]
    }
}

fn check_tag(tag: &str) -> Result<(), OciError> {
    let ok = !tag.is_empty()
        && tag.len() <= 128
        && !tag.starts_with(['.', '-'])
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    ok.then_some(())
        .ok_or_else(|| OciError::BadTag(tag.to_string()))
}

/// The components of an absolute image path, checked.
fn components(path: &str) -> Result<Vec<&str>, OciError> {
    let bad = || OciError::BadPath(path.to_string());
    let rest = path.strip_prefix('/').ok_or_else(bad)?;
    let parts: Vec<&str> = rest.split('/').collect();
    let ok = parts.iter().all(|p| {
        !p.is_empty()
            && *p != "."
            && *p != ".."
            && p.len() < 100 // directories get a trailing '/'
            && p.bytes().all(|b| b.is_ascii_graphic())
    });
    if !ok || rest.len() >= 100 {
        return Err(bad());
    }
    Ok(parts)
}

/// A ustar header block: owner 0:0, mtime 0.
fn tar_header(name: &str, mode: u32, size: u64, typeflag: u8) -> [u8; 512] {
    let mut h = [0u8; 512];
    let mut put = |at: usize, bytes: &[u8]| h[at..at + bytes.len()].copy_from_slice(bytes);
    put(0, name.as_bytes());
    put(100, format!("{mode:07o}\0").as_bytes());
    put(108, b"0000000\0"); // uid
    put(116, b"0000000\0"); // gid
    put(124, format!("{size:011o}\0").as_bytes());
    put(136, b"00000000000\0"); // mtime
    put(148, b"        "); // the checksum counts its own field as spaces
    put(156, &[typeflag]);
    put(257, b"ustar\0");
    put(263, b"00");
    put(265, b"root");
    put(297, b"root");
    put(329, b"0000000\0"); // devmajor
    put(337, b"0000000\0"); // devminor
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h
}

/// An uncompressed ustar archive holding `program` at `path` (mode 0755) and the directories
/// above it (mode 0755), everything owned by 0:0 with mtime 0.
pub fn layer_tar(path: &str, program: &[u8]) -> Result<Vec<u8>, OciError> {
    let parts = components(path)?;
    let size = program.len() as u64;
    if size >= 8 << 30 {
        return Err(OciError::TooLarge(size));
    }
    let mut t = Vec::new();
    for i in 1..parts.len() {
        let dir = format!("{}/", parts[..i].join("/"));
        t.extend_from_slice(&tar_header(&dir, 0o755, 0, b'5'));
    }
    t.extend_from_slice(&tar_header(&parts.join("/"), 0o755, size, b'0'));
    t.extend_from_slice(program);
    t.resize(t.len().next_multiple_of(512), 0);
    t.resize(t.len() + 1024, 0); // two zero blocks end the archive
    Ok(t)
}

/// The image of one static linux/amd64 program at `path`, its entrypoint, tagged `tag`.
pub fn single_binary_image(path: &str, program: &[u8], tag: &str) -> Result<OciImage, OciError> {
    check_tag(tag)?;
    let layer = Blob::new(LAYER_MEDIA_TYPE, layer_tar(path, program)?);
    let json = |v: serde_json::Value| serde_json::to_vec(&v).unwrap_or_default();
    let config = Blob::new(
        CONFIG_MEDIA_TYPE,
        json(serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": { "Entrypoint": [path] },
            "rootfs": { "type": "layers", "diff_ids": [layer.digest] },
        })),
    );
    let manifest = Blob::new(
        MANIFEST_MEDIA_TYPE,
        json(serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "config": config.descriptor(),
            "layers": [layer.descriptor()],
        })),
    );
    let mut m = manifest.descriptor();
    m["annotations"] = serde_json::json!({ REF_NAME: tag });
    m["platform"] = serde_json::json!({ "architecture": "amd64", "os": "linux" });
    let index = json(serde_json::json!({
        "schemaVersion": 2,
        "mediaType": INDEX_MEDIA_TYPE,
        "manifests": [m],
    }));
    Ok(OciImage {
        tag: tag.to_string(),
        layer,
        config,
        manifest,
        index,
    })
}

/// The pod sandbox image: [`Stub::Pause`](super::stub::Stub::Pause) at `/pause`.
pub fn pause_image(tag: &str) -> Result<OciImage, OciError> {
    let program = super::stub::elf(&super::stub::Stub::Pause);
    single_binary_image(PAUSE_PATH, &program, tag)
}

/// The contents of the `oci-layout` file.
pub const OCI_LAYOUT: &str = r#"{"imageLayoutVersion":"1.0.0"}"#;

/// Write `image` as an OCI image layout at `dir`, which must be absent or empty.
pub fn write_layout(image: &OciImage, dir: &Path) -> Result<(), OciError> {
    let io = |what: &'static str, p: &Path| {
        let path = p.display().to_string();
        move |e: std::io::Error| OciError::Io {
            what,
            path,
            why: e.to_string(),
        }
    };
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(OciError::NotEmpty {
                    path: dir.display().to_string(),
                });
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("reading", dir)(e)),
    }
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).map_err(io("creating", &blobs))?;
    for b in image.blobs() {
        let p = blobs.join(b.hex());
        std::fs::write(&p, &b.bytes).map_err(io("writing", &p))?;
    }
    let p = dir.join("oci-layout");
    std::fs::write(&p, OCI_LAYOUT).map_err(io("writing", &p))?;
    let p = dir.join("index.json");
    std::fs::write(&p, &image.index).map_err(io("writing", &p))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    fn octal(field: &[u8]) -> u64 {
        let s = std::str::from_utf8(field).unwrap();
        u64::from_str_radix(s.trim_matches(|c| c == '\0' || c == ' '), 8).unwrap()
    }

    #[test]
    fn tar_headers_carry_valid_checksums_sizes_and_an_end_marker() {
        let prog = b"not really a program";
        let t = layer_tar("/usr/bin/x", prog).unwrap();
        assert_eq!(t.len() % 512, 0);
        assert!(t[t.len() - 1024..].iter().all(|&b| b == 0));
        let headers: Vec<&[u8]> = vec![&t[0..512], &t[512..1024], &t[1024..1536]];
        for h in &headers {
            let mut copy = h.to_vec();
            copy[148..156].copy_from_slice(b"        ");
            let sum: u64 = copy.iter().map(|&b| u64::from(b)).sum();
            assert_eq!(octal(&h[148..156]), sum);
            assert_eq!(&h[257..263], b"ustar\0");
            assert_eq!(octal(&h[100..108]), 0o755);
            assert_eq!(octal(&h[136..148]), 0, "mtime");
        }
        assert_eq!(&headers[0][..5], b"usr/\0");
        assert_eq!(&headers[1][..9], b"usr/bin/\0");
        assert_eq!(&headers[2][..10], b"usr/bin/x\0");
        assert_eq!(octal(&headers[2][124..136]), prog.len() as u64);
        assert_eq!(&t[1536..1536 + prog.len()], prog);
    }

    #[test]
    fn gnu_tar_lists_the_layer() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("layer.tar");
        std::fs::write(&p, layer_tar("/pause", &[7u8; 1000]).unwrap()).unwrap();
        let out = std::process::Command::new("tar")
            .args(["--numeric-owner", "-tvf"])
            .arg(&p)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let listing = String::from_utf8(out.stdout).unwrap();
        let words: Vec<&str> = listing.split_whitespace().collect();
        assert_eq!(words[0], "-rwxr-xr-x", "{listing}");
        assert_eq!(words[1], "0/0", "{listing}");
        assert_eq!(words[2], "1000", "{listing}");
        assert_eq!(words[3], "1970-01-01", "{listing}");
        assert_eq!(*words.last().unwrap(), "pause", "{listing}");
        assert_eq!(listing.lines().count(), 1, "{listing}");
    }

    #[test]
    fn bad_paths_and_tags_are_refused() {
        for p in ["pause", "/", "/a//b", "/a/../b", "/a/./b", "/a b", "/dir/"] {
            assert_eq!(layer_tar(p, b"x"), Err(OciError::BadPath(p.into())), "{p}");
        }
        let long = format!("/{}", "a".repeat(100));
        assert!(layer_tar(&long, b"x").is_err());
        for t in ["", ".x", "-x", "a:b", "a/b", &"a".repeat(129)] {
            assert_eq!(
                single_binary_image("/p", b"x", t),
                Err(OciError::BadTag(t.into()))
            );
        }
    }

    #[test]
    fn the_image_is_reproducible_and_its_descriptors_match_its_blobs() {
        let a = pause_image(PAUSE_TAG).unwrap();
        assert_eq!(a, pause_image(PAUSE_TAG).unwrap());
        // The tag names the manifest in the index; the image itself does not change.
        let other = pause_image("other").unwrap();
        assert_eq!(a.manifest, other.manifest);
        assert_ne!(a.index, other.index);
        let manifest: serde_json::Value = serde_json::from_slice(&a.manifest.bytes).unwrap();
        assert_eq!(manifest["schemaVersion"], 2);
        assert_eq!(manifest["mediaType"], MANIFEST_MEDIA_TYPE);
        assert_eq!(manifest["config"]["digest"], a.config.digest);
        assert_eq!(manifest["config"]["size"], a.config.bytes.len());
        assert_eq!(manifest["config"]["mediaType"], CONFIG_MEDIA_TYPE);
        assert_eq!(manifest["layers"][0]["digest"], a.layer.digest);
        assert_eq!(manifest["layers"][0]["size"], a.layer.bytes.len());
        assert_eq!(manifest["layers"][0]["mediaType"], LAYER_MEDIA_TYPE);
        let config: serde_json::Value = serde_json::from_slice(&a.config.bytes).unwrap();
        assert_eq!(config["architecture"], "amd64");
        assert_eq!(config["os"], "linux");
        assert_eq!(config["config"]["Entrypoint"][0], PAUSE_PATH);
        assert_eq!(config["rootfs"]["diff_ids"][0], a.layer.digest);
        let index: serde_json::Value = serde_json::from_slice(&a.index).unwrap();
        assert_eq!(index["manifests"][0]["digest"], a.manifest.digest);
        assert_eq!(index["manifests"][0]["annotations"][REF_NAME], PAUSE_TAG);
    }

    #[test]
    fn the_layout_on_disk_is_content_addressed() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("layout");
        let img = pause_image(PAUSE_TAG).unwrap();
        write_layout(&img, &out).unwrap();
        assert_eq!(
            std::fs::read_to_string(out.join("oci-layout")).unwrap(),
            OCI_LAYOUT
        );
        assert_eq!(std::fs::read(out.join("index.json")).unwrap(), img.index);
        let mut names: Vec<String> = std::fs::read_dir(out.join("blobs/sha256"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names.len(), 3);
        for n in names {
            let bytes = std::fs::read(out.join("blobs/sha256").join(&n)).unwrap();
            assert_eq!(sha256_digest(&bytes), format!("sha256:{n}"));
        }
        let again = write_layout(&img, &out).unwrap_err();
        assert!(matches!(again, OciError::NotEmpty { .. }), "{again}");
    }
}
