//! Verified releases end to end on loopback: keys made by the stock `minisign -G -W`, a node
//! image root that trusts them (etc/keel/trusted-keys, etc/keel/security-version), manifests
//! written by `release::manifest`/`release::write_manifest` and served by a real HTTP server,
//! keel-agent over mutual TLS on a disk image file, and `osctl install --release`.
//!
//! Every refused manifest must leave the disk file byte for byte as it was.
//!
//! The stock tool is required: without it these tests fail (install it with
//! `apt-get install minisign`, or run ci/install-deps).
#![allow(clippy::unwrap_used, clippy::panic)]

mod agent_common;

use agent_common::{http_server, image, run_v1, sha, start_node_with, HttpServer, Node};
use keelos::agent::proto;
use keelos::image::bootfiles::BootFiles;
use keelos::image::release::{self, Release, ReleaseSigner};
use keelos::pki::Role;
use keelos::update::manifest::{self, TrustedKey, TrustedKeys};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const IMG_LEN: usize = 300_000;

/// A key pair made by `minisign -G -W` in its own directory.
struct Keys {
    dir: tempfile::TempDir,
}

impl Keys {
    fn new() -> Keys {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("minisign")
            .args(["-G", "-W", "-p", "k.pub", "-s", "k.key"])
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run the stock minisign tool ({e}): these tests need it; install it \
                     with `apt-get install minisign` (ci/install-deps does)"
                )
            });
        assert!(
            out.status.success(),
            "minisign -G -W failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Keys { dir }
    }
    fn public_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("k.pub")).unwrap()
    }
    fn trusted(&self) -> TrustedKey {
        TrustedKey::parse("k.pub", &self.public_text()).unwrap()
    }
    fn trust(&self) -> TrustedKeys {
        let mut t = TrustedKeys::default();
        t.insert(self.trusted()).unwrap();
        t
    }
    fn signer(&self) -> ReleaseSigner {
        ReleaseSigner::from_file(&self.dir.path().join("k.key")).unwrap()
    }
}

/// A running image's root as keel-image lays it out: `keys` under etc/keel/trusted-keys (the
/// stock tool's .pub files) and, when given, etc/keel/security-version.
fn image_root(dir: &Path, keys: &[&Keys], security_version: Option<u64>) -> PathBuf {
    let root = dir.join("image-root");
    let kd = root.join(manifest::TRUSTED_KEYS_DIR);
    std::fs::create_dir_all(&kd).unwrap();
    for k in keys {
        std::fs::write(kd.join(k.trusted().file_name()), k.public_text()).unwrap();
    }
    if let Some(v) = security_version {
        std::fs::write(
            root.join(manifest::SECURITY_VERSION_FILE),
            manifest::security_version_text(v),
        )
        .unwrap();
    }
    root
}

fn hex(c: char) -> String {
    std::iter::repeat_n(c, 64).collect()
}

/// A release of `img` as `release::build` records it (the "compressed" artifact is the image
/// itself: the engine takes either), with a delta when one is given (name, base, patch).
fn a_release(
    version: &str,
    security_version: u64,
    img: &[u8],
    delta: Option<(&str, &[u8], &[u8])>,
) -> Release {
    let out = Path::new("/srv/releases").join(version);
    Release {
        version: version.into(),
        kernel_release: "6.1.0-48-amd64".into(),
        kernel_package: "linux-image-6.1.0-48-amd64".into(),
        kernel_version: "6.1.172-1".into(),
        kernel: out.join(release::KERNEL_FILE),
        initramfs: out.join(release::INITRAMFS_FILE),
        root: out.join(release::ROOT_FILE),
        root_sha256: sha(img),
        root_len: img.len() as u64,
        initramfs_len: 1,
        compressed: out.join("image.img"),
        compressed_len: img.len() as u64,
        compressed_sha256: sha(img),
        security_version,
        trusted_keys: vec![],
        signed_by: None,
        delta: delta.map(|(name, base, patch)| release::DeltaArtifact {
            from_version: "1.0".into(),
            from_sha256: sha(base),
            path: out.join(name),
            len: patch.len() as u64,
            sha256: sha(patch),
        }),
        verity: None,
        modules: vec![],
        slot_boot: BootFiles {
            kernel_release: "6.1.0-48-amd64".into(),
            kernel_sha256: hex('e'),
            kernel_len: 1,
            initramfs_sha256: hex('f'),
            initramfs_len: 1,
        },
        broken: None,
    }
}

/// release.json and, when `signer` is given, its signature, as keel-image writes them.
fn written(rel: &Release, signer: Option<&Keys>) -> (Vec<u8>, Option<Vec<u8>>) {
    let d = tempfile::tempdir().unwrap();
    let (trust, s) = match signer {
        Some(k) => (k.trust(), Some(k.signer())),
        None => (TrustedKeys::default(), None),
    };
    release::write_manifest(d.path(), &release::manifest(rel), &trust, s.as_ref()).unwrap();
    (
        std::fs::read(d.path().join(release::MANIFEST_FILE)).unwrap(),
        std::fs::read(d.path().join(release::SIGNATURE_FILE)).ok(),
    )
}

/// Serve a release directory at `dir` (e.g. "/r1/"): the manifest, its signature when there is
/// one, the image and the delta when given. Returns the manifest's URL.
fn publish(
    srv: &HttpServer,
    dir: &str,
    manifest: Vec<u8>,
    sig: Option<Vec<u8>>,
    img: &[u8],
    delta: Option<(&str, &[u8])>,
) -> String {
    srv.put(&format!("{dir}release.json"), manifest);
    if let Some(s) = sig {
        srv.put(&format!("{dir}release.json.minisig"), s);
    }
    srv.put(&format!("{dir}image.img"), img.to_vec());
    if let Some((name, patch)) = delta {
        srv.put(&format!("{dir}{name}"), patch.to_vec());
    }
    srv.url(&format!("{dir}release.json"))
}

fn release_req(url: &str, allow_downgrade: bool) -> proto::InstallRequest {
    proto::InstallRequest {
        release_url: url.into(),
        allow_downgrade,
        ..Default::default()
    }
}

/// The install's events (progress details and the result), or the refusal.
async fn install(
    node: &Node,
    req: proto::InstallRequest,
) -> Result<(Vec<String>, proto::InstallResult), tonic::Status> {
    let mut s = node
        .client(Role::Admin)
        .install_update(req)
        .await?
        .into_inner();
    let (mut details, mut result) = (Vec::new(), None);
    while let Some(e) = s.message().await.unwrap() {
        match e.event {
            Some(proto::install_event::Event::Progress(p)) => details.push(p.detail),
            Some(proto::install_event::Event::Result(r)) => result = Some(r),
            None => {}
        }
    }
    Ok((details, result.unwrap()))
}

async fn status(node: &Node) -> proto::StatusReply {
    node.client(Role::Reader)
        .status(proto::StatusRequest {})
        .await
        .unwrap()
        .into_inner()
}

fn slot<'a>(s: &'a proto::StatusReply, l: &str) -> &'a proto::SlotInfo {
    s.slots.iter().find(|x| x.slot == l).unwrap()
}

/// A node running v1 from slot A whose agent reads its trust from `root` (`None`: a
/// development image root with no keys and no security version).
async fn node_trusting(v1: &[u8], root: Option<PathBuf>) -> Node {
    let mut node = start_node_with(|d| run_v1(d, v1)).await;
    let root = match root {
        Some(r) => r,
        None => {
            let r = node.dir.path().join("dev-image-root");
            std::fs::create_dir_all(r.join("etc")).unwrap();
            r
        }
    };
    node.restart_agent(|c| c.image_root = Some(root)).await;
    node
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_release_installs_through_osctl_with_its_delta_and_status_shows_signed_mode() {
    let keys = Keys::new();
    let v1 = image(1, IMG_LEN);
    let tmp = tempfile::tempdir().unwrap();
    let node = node_trusting(&v1, Some(image_root(tmp.path(), &[&keys], Some(2)))).await;
    let s = status(&node).await;
    let id = keys.trusted().id().to_string();
    assert_eq!(
        s.update_trust,
        format!("signed: 1 trusted key ({id}), security version 2")
    );

    // v2 = v1 with a few changed regions, and its delta from v1
    let mut v2 = v1.clone();
    for i in (0..IMG_LEN).step_by(50_000) {
        v2[i..i + 300].copy_from_slice(&image(9, 300));
    }
    let mut patch = Vec::new();
    qbsdiff::Bsdiff::new(&v1, &v2).compare(&mut patch).unwrap();
    let rel = a_release("2.0", 3, &v2, Some(("from-1.0.bsdiff", &v1, &patch)));
    let (m, sig) = written(&rel, Some(&keys));
    assert!(sig.is_some());
    let srv = http_server().await;
    let url = publish(
        &srv,
        "/r/2.0/",
        m,
        sig,
        &v2,
        Some(("from-1.0.bsdiff", &patch)),
    );
    let (code, out, err) =
        node_osctl(&node, &["--output", "json", "install", "--release", &url]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    let last: serde_json::Value =
        serde_json::from_str(&out[out.rfind("\n{").map_or(0, |i| i + 1)..])
            .unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(last["ok"], true, "{out}");
    assert_eq!(last["staged_slot"], "b");
    assert_eq!(last["version"], "2.0");
    assert_eq!(last["fallback_used"], false, "{out}");
    assert_eq!(
        last["bytes_saved"],
        (IMG_LEN - patch.len()) as u64,
        "the delta named in the manifest was used: {out}"
    );
    let trust = last["trust"].as_str().unwrap();
    assert!(
        trust.contains(&format!("signed by trusted key {id}")),
        "{trust}"
    );
    assert!(trust.contains("security version 3"), "{trust}");

    let s = status(&node).await;
    let b = slot(&s, "b");
    assert_eq!(b.state, "trying", "{b:?}");
    let img = b.image.as_ref().unwrap();
    assert_eq!(img.sha256, sha(&v2));
    assert_eq!(img.version, "2.0");
    assert_eq!(s.next_boot_slot, "b");
    assert_eq!(slot(&s, "a").image.as_ref().unwrap().sha256, sha(&v1));

    // The same release whose delta was made from another image: the full image is used.
    let rel = a_release(
        "2.1",
        3,
        &v2,
        Some(("from-9.bsdiff", &image(7, 10), &patch)),
    );
    let (m, sig) = written(&rel, Some(&keys));
    let url = publish(&srv, "/r/2.1/", m, sig, &v2, None);
    let (_, r) = install(&node, release_req(&url, false)).await.unwrap();
    assert!(r.ok, "{r:?}");
    assert!(!r.fallback_used, "the delta was never tried: {r:?}");
    assert_eq!(r.bytes_saved, 0, "{r:?}");
    assert_eq!(r.version, "2.1");

    // A delta for the running image whose served bytes are not the signed ones (one byte
    // changed): it never reaches the patch applier; the full image is installed, and why.
    let rel = a_release("2.2", 3, &v2, Some(("from-1.0.bsdiff", &v1, &patch)));
    let (m, sig) = written(&rel, Some(&keys));
    let mut altered = patch.clone();
    let mid = altered.len() / 2;
    altered[mid] ^= 0x20;
    let url = publish(
        &srv,
        "/r/2.2/",
        m,
        sig,
        &v2,
        Some(("from-1.0.bsdiff", &altered)),
    );
    let (_, r) = install(&node, release_req(&url, false)).await.unwrap();
    assert!(r.ok, "{r:?}");
    assert!(r.fallback_used, "{r:?}");
    assert!(
        r.fallback_reason
            .contains("is not the one the signed manifest gives"),
        "{r:?}"
    );
    assert_eq!(r.bytes_saved, 0, "{r:?}");

    // osctl status shows the mode, in text and JSON
    let (code, out, err) = node_osctl(&node, &["status"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("update trust: signed: 1 trusted key ({id})")),
        "{out}"
    );
    let (_, out, _) = node_osctl(&node, &["--output", "json", "status"]).await;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        v["update_trust"].as_str().unwrap().starts_with("signed: "),
        "{out}"
    );
}

async fn node_osctl(node: &Node, args: &[&str]) -> (i32, String, String) {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let (c, k) = node.role_paths(Role::Admin);
    let cfg = node.osctl_config(&c, &k);
    tokio::task::spawn_blocking(move || {
        let out = Command::new(env!("CARGO_BIN_EXE_osctl"))
            .arg("--config")
            .arg(cfg)
            .args(&args)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_node_refuses_every_bad_manifest_and_writes_nothing() {
    let (keys, other) = (Keys::new(), Keys::new());
    let v1 = image(1, IMG_LEN);
    let tmp = tempfile::tempdir().unwrap();
    let node = node_trusting(&v1, Some(image_root(tmp.path(), &[&keys], None))).await;
    let srv = http_server().await;
    let v2 = image(2, IMG_LEN);
    let rel = a_release("2.0", 1, &v2, None);
    let (good, good_sig) = written(&rel, Some(&keys));
    let good_sig = good_sig.unwrap();

    let mut altered = String::from_utf8(good.clone()).unwrap();
    assert!(altered.contains("\"version\": \"2.0\""));
    altered = altered.replace("\"version\": \"2.0\"", "\"version\": \"2.9\"");
    let (unsigned, none) = written(&rel, None);
    assert!(none.is_none());
    let (by_other, other_sig) = written(&rel, Some(&other));
    let mut big = good.clone();
    big.resize(manifest::MAX_MANIFEST_BYTES + 1, b' ');

    // (what, manifest, signature, what the refusal says)
    type Case<'a> = (&'a str, Vec<u8>, Option<Vec<u8>>, &'a str);
    let cases: Vec<Case> = vec![
        ("unsigned", unsigned, None, "not signed"),
        (
            "wrong key",
            by_other,
            other_sig,
            "which this image does not trust",
        ),
        (
            "altered",
            altered.into_bytes(),
            Some(good_sig.clone()),
            "does not verify",
        ),
        (
            "truncated",
            good[..good.len() / 2].to_vec(),
            Some(good_sig.clone()),
            "does not verify",
        ),
        (
            "truncated signature",
            good.clone(),
            Some(good_sig[..good_sig.len() - 20].to_vec()),
            "signature",
        ),
        (
            "over the cap",
            big,
            Some(good_sig.clone()),
            "65536-byte limit",
        ),
    ];
    let before = node.disk_bytes();
    for (i, (what, m, sig, expect)) in cases.into_iter().enumerate() {
        let url = publish(&srv, &format!("/bad{i}/"), m, sig, &v2, None);
        let e = install(&node, release_req(&url, false))
            .await
            .map(|(_, r)| r)
            .expect_err(what);
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{what}: {e}");
        assert!(e.message().contains(expect), "{what}: {}", e.message());
        assert!(
            e.message().contains("nothing was written"),
            "{what}: {}",
            e.message()
        );
        assert!(node.disk_bytes() == before, "{what}: the disk changed");
    }
    // A manifest that is not there.
    let e = install(&node, release_req(&srv.url("/missing/release.json"), false))
        .await
        .map(|(_, r)| r)
        .unwrap_err();
    assert!(
        e.message().contains("cannot download the release manifest"),
        "{}",
        e.message()
    );
    assert!(
        node.disk_bytes() == before,
        "missing manifest: the disk changed"
    );
    // A plain --image/--sha256 request: refused with a pointer to --release.
    srv.put("/v2.img", v2.clone());
    let (code, out, err) = node_osctl(
        &node,
        &[
            "install",
            "--image",
            &srv.url("/v2.img"),
            "--sha256",
            &sha(&v2),
        ],
    )
    .await;
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(err.contains("osctl install --release"), "{err}");
    assert!(
        node.disk_bytes() == before,
        "plain install: the disk changed"
    );
    let s = status(&node).await;
    assert_eq!(s.next_boot_slot, "a");
    assert!(!slot(&s, "b").bootable);
    assert!(
        s.update.is_none(),
        "no install ever started: {:?}",
        s.update
    );

    // The good release is still accepted (security version 0 when the image has no file).
    let url = publish(&srv, "/good/", good, Some(good_sig), &v2, None);
    let (_, r) = install(&node, release_req(&url, false)).await.unwrap();
    assert!(r.ok, "{r:?}");
    assert_eq!(
        slot(&status(&node).await, "b")
            .image
            .as_ref()
            .unwrap()
            .sha256,
        sha(&v2)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lower_security_version_is_refused_unless_the_downgrade_is_allowed_and_reported() {
    let keys = Keys::new();
    let v1 = image(1, IMG_LEN);
    let tmp = tempfile::tempdir().unwrap();
    let node = node_trusting(&v1, Some(image_root(tmp.path(), &[&keys], Some(3)))).await;
    let srv = http_server().await;
    let v2 = image(2, IMG_LEN);
    let (m, sig) = written(&a_release("0.9", 2, &v2, None), Some(&keys));
    let url = publish(&srv, "/old/", m, sig, &v2, None);
    let before = node.disk_bytes();
    let e = install(&node, release_req(&url, false)).await.unwrap_err();
    assert!(
        e.message()
            .contains("security version 2, lower than the running 3"),
        "{}",
        e.message()
    );
    assert!(node.disk_bytes() == before);

    // allowed: still checked (an unsigned old release stays refused) ...
    let (m, _) = written(&a_release("0.9", 2, &v2, None), None);
    let unsigned = publish(&srv, "/old-unsigned/", m, None, &v2, None);
    let e = install(&node, release_req(&unsigned, true))
        .await
        .unwrap_err();
    assert!(e.message().contains("not signed"), "{}", e.message());
    assert!(node.disk_bytes() == before);

    // ... and a signed one goes in, the downgrade reported in the stream and the result.
    let (details, r) = install(&node, release_req(&url, true)).await.unwrap();
    assert!(r.ok, "{r:?}");
    assert!(
        r.trust.contains(
            "SECURITY DOWNGRADE allowed by the operator: security version 2 replaces the running 3"
        ),
        "{}",
        r.trust
    );
    assert!(
        details.iter().any(|d| d.contains("SECURITY DOWNGRADE")),
        "{details:?}"
    );
    let s = status(&node).await;
    assert_eq!(slot(&s, "b").image.as_ref().unwrap().version, "0.9");
    assert!(s
        .update
        .unwrap()
        .result
        .unwrap()
        .trust
        .contains("DOWNGRADE"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_development_node_takes_plain_and_unsigned_installs_and_says_so() {
    let v1 = image(1, IMG_LEN);
    let node = node_trusting(&v1, None).await;
    let s = status(&node).await;
    assert_eq!(
        s.update_trust,
        "development: unsigned images accepted (the image trusts no signing key), security \
         version 0"
    );
    let (_, out, _) = node_osctl(&node, &["status"]).await;
    assert!(out.contains("update trust: development: "), "{out}");

    let srv = http_server().await;
    let v2 = image(2, IMG_LEN);
    srv.put("/v2.img", v2.clone());
    let (code, out, err) = node_osctl(
        &node,
        &[
            "install",
            "--image",
            &srv.url("/v2.img"),
            "--sha256",
            &sha(&v2),
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("trust: unsigned image"), "{out}");

    let v3 = image(3, IMG_LEN);
    let (m, _) = written(&a_release("3.0", 0, &v3, None), None);
    let url = publish(&srv, "/r3/", m, None, &v3, None);
    let (_, r) = install(&node, release_req(&url, false)).await.unwrap();
    assert!(r.ok, "{r:?}");
    assert!(
        r.trust.contains("unsigned (development image)"),
        "{}",
        r.trust
    );
    assert_eq!(
        slot(&status(&node).await, "b")
            .image
            .as_ref()
            .unwrap()
            .sha256,
        sha(&v3)
    );
}

#[test]
fn osctl_refuses_to_mix_release_and_image_forms() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("none.json");
    for args in [
        vec!["install", "--release", "http://h/r.json", "--sha256", "ab"],
        vec![
            "install",
            "--release",
            "http://h/r.json",
            "--image",
            "http://h/i",
        ],
        vec![
            "install",
            "--allow-downgrade",
            "--image",
            "http://h/i",
            "--sha256",
            "ab",
        ],
        vec!["install"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_osctl"))
            .arg("--config")
            .arg(&cfg)
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: usage error expected");
    }
}
