//! The pause image in a real registry: `keel-image build pause-image` writes an OCI layout,
//! skopeo pushes it to Debian's docker-registry on loopback, and the registry then serves, over
//! plain HTTP, the manifest with the digest keel-image printed and the very layer it built.
//! Needs docker-registry and skopeo (ci/install-deps).

#![allow(clippy::unwrap_used, clippy::panic)]

use keelos::cluster::registry::{push_oci_layout, Registry};
use keelos::image::oci::{self, sha256_digest, MANIFEST_MEDIA_TYPE};
use std::process::Command;

/// Run keel-image build pause-image; the manifest digest it prints.
fn build_pause_image(out: &std::path::Path, tag: &str) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_keel-image"))
        .args(["build", "pause-image", "--tag", tag, "--out"])
        .arg(out)
        .output()
        .unwrap();
    assert!(o.status.success(), "keel-image: {o:?}");
    String::from_utf8(o.stdout).unwrap().trim().to_string()
}

#[test]
fn the_pause_image_pushed_with_skopeo_is_served_unchanged() {
    let d = tempfile::tempdir().unwrap();
    let layout = d.path().join("pause-layout");
    let digest = build_pause_image(&layout, oci::PAUSE_TAG);
    let image = oci::pause_image(oci::PAUSE_TAG).unwrap();
    assert_eq!(
        digest, image.manifest.digest,
        "keel-image and the library agree"
    );
    assert!(
        digest.starts_with("sha256:") && digest.len() == 71,
        "{digest}"
    );

    let mut registry = Registry::start(&d.path().join("registry")).unwrap();
    push_oci_layout(&layout, oci::PAUSE_TAG, &registry, "pause:3.10.1").unwrap();

    // What a client reading the registry sees: the manifest, byte for byte, under our digest.
    let m = registry
        .get("/v2/pause/manifests/3.10.1", MANIFEST_MEDIA_TYPE)
        .unwrap();
    assert_eq!(m.status, 200, "{}", String::from_utf8_lossy(&m.body));
    assert_eq!(m.header("docker-content-digest"), Some(digest.as_str()));
    assert_eq!(m.header("content-type"), Some(MANIFEST_MEDIA_TYPE));
    assert_eq!(sha256_digest(&m.body), digest);
    assert_eq!(m.body, image.manifest.bytes);

    // The layer and config blobs, byte for byte.
    for blob in [&image.layer, &image.config] {
        let b = registry
            .get(
                &format!("/v2/pause/blobs/{}", blob.digest),
                "application/octet-stream",
            )
            .unwrap();
        assert_eq!(b.status, 200, "{}", blob.digest);
        assert_eq!(b.body, blob.bytes, "{}", blob.media_type);
    }

    // skopeo, as a second client, reads the same digest back.
    let o = Command::new("skopeo")
        .args(["inspect", "--tls-verify=false", "--no-creds"])
        .arg(format!("docker://{}/pause:3.10.1", registry.host()))
        .output()
        .unwrap();
    assert!(o.status.success(), "skopeo inspect: {o:?}");
    let info: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(info["Digest"], digest.as_str());
    assert_eq!(info["Architecture"], "amd64");
    assert_eq!(info["Os"], "linux");
    assert_eq!(info["Layers"][0], image.layer.digest.as_str());

    // An unknown tag is a 404, not some other image.
    let missing = registry
        .get("/v2/pause/manifests/0.0.0", MANIFEST_MEDIA_TYPE)
        .unwrap();
    assert_eq!(missing.status, 404);

    // Once the registry is gone, pushing fails and says where to look.
    registry.stop();
    let e = push_oci_layout(&layout, oci::PAUSE_TAG, &registry, "pause:again").unwrap_err();
    assert!(e.contains("skopeo copy"), "{e}");
    assert!(e.contains(&registry.host()), "{e}");
    assert!(e.contains("is the registry running"), "{e}");
}

#[test]
fn keel_image_builds_the_same_layout_twice() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    assert_eq!(
        build_pause_image(&a, "3.10.1"),
        build_pause_image(&b, "3.10.1")
    );
    for f in ["index.json", "oci-layout"] {
        assert_eq!(
            std::fs::read(a.join(f)).unwrap(),
            std::fs::read(b.join(f)).unwrap()
        );
    }
    // A bad tag is refused before anything is written.
    let o = Command::new(env!("CARGO_BIN_EXE_keel-image"))
        .args(["build", "pause-image", "--tag", "no:colons", "--out"])
        .arg(d.path().join("c"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("not an image tag"),
        "{o:?}"
    );
    assert!(!d.path().join("c").exists());
}
