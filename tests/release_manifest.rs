//! Release manifests against the stock `minisign` tool (Debian's package): keys made by
//! `minisign -G -W`, our signatures checked by `minisign -V`, its signatures checked by
//! [`manifest::verify`], and every way a manifest or signature can be damaged, refused.
//!
//! No Debian build: the manifest comes from a hand-made [`Release`] through the same
//! `release::manifest` and `release::write_manifest` that `keel-image build release` uses.
//!
//! The stock tool is required: without it these tests fail (install it with
//! `apt-get install minisign`, or run ci/install-deps).
//!
//! The property tests persist failing cases in tests/release_manifest.proptest-regressions
//! (proptest replays them first on the next run) and each failure message holds the key, the
//! manifest and the signature, so it can be replayed by hand whatever keys the run made.

#![allow(clippy::unwrap_used, clippy::panic)]

use keelos::image::bootfiles::BootFiles;
use keelos::image::release::{self, Release, ReleaseSigner, SigningError};
use keelos::update::manifest::{
    self, Authority, Downgrade, ManifestError, Policy, SignatureForm, TrustedKey, TrustedKeys,
};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

fn minisign(args: &[&str], dir: &Path) -> Output {
    let out = Command::new("minisign")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run the stock minisign tool ({e}): these tests need it; install it with \
                 `apt-get install minisign` (ci/install-deps does)"
            )
        });
    out
}

fn ok(out: Output, what: &str) -> Output {
    assert!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A key pair made by `minisign -G -W` in its own directory.
struct Keys {
    dir: tempfile::TempDir,
}

impl Keys {
    fn new() -> Keys {
        let dir = tempfile::tempdir().unwrap();
        ok(
            minisign(&["-G", "-W", "-p", "k.pub", "-s", "k.key"], dir.path()),
            "minisign -G -W",
        );
        Keys { dir }
    }
    fn public_path(&self) -> PathBuf {
        self.dir.path().join("k.pub")
    }
    fn secret_path(&self) -> PathBuf {
        self.dir.path().join("k.key")
    }
    fn public_text(&self) -> String {
        std::fs::read_to_string(self.public_path()).unwrap()
    }
    fn trusted(&self) -> TrustedKey {
        TrustedKey::parse("k.pub", &self.public_text()).unwrap()
    }
    fn signer(&self) -> ReleaseSigner {
        ReleaseSigner::from_file(&self.secret_path()).unwrap()
    }
    /// The key id the stock tool prints in the .pub file's comment, in our form: minisign 0.11
    /// prints it without leading zeros, we always give 16 digits (they name files).
    fn id_as_minisign_prints_it(&self) -> String {
        let printed = self
            .public_text()
            .lines()
            .next()
            .unwrap()
            .rsplit(' ')
            .next()
            .unwrap()
            .to_string();
        format!("{:016X}", u64::from_str_radix(&printed, 16).unwrap())
    }
}

/// Two key pairs, made once for the whole file (each `minisign -G` is quick, but the
/// property tests sign many manifests).
fn keys() -> &'static (Keys, Keys) {
    static K: OnceLock<(Keys, Keys)> = OnceLock::new();
    K.get_or_init(|| (Keys::new(), Keys::new()))
}

fn trust(keys: &[&Keys]) -> TrustedKeys {
    let mut t = TrustedKeys::default();
    for k in keys {
        t.insert(k.trusted()).unwrap();
    }
    t
}

fn hex(c: char) -> String {
    std::iter::repeat_n(c, 64).collect()
}

/// A release as `release::build` records it, with made-up digests.
fn a_release(security_version: u64) -> Release {
    let out = Path::new("/srv/releases/1.2.0");
    Release {
        version: "1.2.0".into(),
        kernel_release: "6.1.0-48-amd64".into(),
        kernel_package: "linux-image-6.1.0-48-amd64".into(),
        kernel_version: "6.1.172-1".into(),
        kernel: out.join(release::KERNEL_FILE),
        initramfs: out.join(release::INITRAMFS_FILE),
        root: out.join(release::ROOT_FILE),
        root_sha256: hex('a'),
        root_len: 300 << 20,
        initramfs_len: 9 << 20,
        compressed: out.join(release::COMPRESSED_FILE),
        compressed_len: 120 << 20,
        compressed_sha256: hex('b'),
        security_version,
        trusted_keys: vec![],
        signed_by: None,
        delta: Some(release::DeltaArtifact {
            from_version: "1.1.0".into(),
            from_sha256: hex('c'),
            path: out.join("delta-from-1.1.0.bsdiff"),
            len: 4 << 20,
            sha256: hex('d'),
        }),
        verity: None,
        modules: vec!["virtio_blk".into()],
        slot_boot: BootFiles {
            kernel_release: "6.1.0-48-amd64".into(),
            kernel_sha256: hex('e'),
            kernel_len: 8 << 20,
            initramfs_sha256: hex('f'),
            initramfs_len: 9 << 20,
        },
        broken: None,
    }
}

fn policy(running: u64) -> Policy {
    Policy {
        running_security_version: running,
        allow_downgrade: false,
    }
}

/// release.json (and its signature when `signer` is given) in a fresh directory.
fn written(
    security_version: u64,
    trusted: &TrustedKeys,
    signer: Option<&ReleaseSigner>,
) -> (tempfile::TempDir, Vec<u8>, Option<Vec<u8>>) {
    let d = tempfile::tempdir().unwrap();
    let m = release::manifest(&a_release(security_version));
    release::write_manifest(d.path(), &m, trusted, signer).unwrap();
    let bytes = std::fs::read(d.path().join(release::MANIFEST_FILE)).unwrap();
    let sig = std::fs::read(d.path().join(release::SIGNATURE_FILE)).ok();
    (d, bytes, sig)
}

/// One release signed by key A (made by us), reused by the property tests.
fn signed_fixture() -> &'static (Vec<u8>, Vec<u8>) {
    static F: OnceLock<(Vec<u8>, Vec<u8>)> = OnceLock::new();
    F.get_or_init(|| {
        let (a, _) = keys();
        let (_d, m, s) = written(3, &trust(&[a]), Some(&a.signer()));
        (m, s.unwrap())
    })
}

#[test]
fn the_manifest_holds_the_release_and_names_files_beside_it() {
    let m = release::manifest(&a_release(7));
    let v: serde_json::Value = serde_json::from_slice(&m.to_bytes()).unwrap();
    assert_eq!(v["format"], 1);
    assert_eq!(v["security_version"], 7);
    assert_eq!(v["compressed"]["name"], "root.img.zst");
    assert_eq!(v["delta"]["name"], "delta-from-1.1.0.bsdiff");
    assert_eq!(v["delta"]["base_sha256"], hex('c'));
    assert_eq!(v["kernel_sha256"], hex('e'));
    assert_eq!(v["initramfs_sha256"], hex('f'));
    assert!(v.get("verity").is_none(), "no verity fields yet: {v}");
    assert!(!String::from_utf8(m.to_bytes()).unwrap().contains("/srv"));
}

#[test]
fn our_signature_verifies_with_the_stock_tool() {
    let (a, _) = keys();
    let trusted = trust(&[a]);
    let (d, bytes, sig) = written(3, &trusted, Some(&a.signer()));
    let sig = sig.expect("--sign writes release.json.minisig");
    // -H: the stock tool must see a prehashed signature.
    let pubkey = a.public_path();
    ok(
        minisign(
            &[
                "-V",
                "-H",
                "-p",
                pubkey.to_str().unwrap(),
                "-m",
                "release.json",
            ],
            d.path(),
        ),
        "minisign -V of keel-image's signature",
    );
    // The key file an image carries works with the stock tool too.
    let carried = d.path().join(a.trusted().file_name());
    std::fs::write(&carried, a.trusted().to_file_text()).unwrap();
    ok(
        minisign(
            &["-V", "-p", carried.to_str().unwrap(), "-m", "release.json"],
            d.path(),
        ),
        "minisign -V with the image's copy of the key",
    );
    let v = manifest::verify(&bytes, &sig, &trusted, policy(3)).unwrap();
    assert_eq!(v.key_id(), Some(a.trusted().id()));
    assert_eq!(v.signature_form(), Some(SignatureForm::Prehashed));
    assert_eq!(v.downgrade(), None);
    assert_eq!(v.manifest().version, "1.2.0");
    match v.authority() {
        Authority::Signed {
            trusted_comment, ..
        } => assert!(
            trusted_comment.contains("security_version 3"),
            "{trusted_comment}"
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_stock_tools_signatures_verify_here_prehashed_and_legacy() {
    let (a, _) = keys();
    let trusted = trust(&[a]);
    let (d, bytes, sig) = written(3, &trusted, None);
    assert!(sig.is_none(), "no --sign, no signature");
    let secret = a.secret_path();
    for (flags, form) in [
        (&[][..], SignatureForm::Prehashed),
        (&["-l"][..], SignatureForm::Legacy),
    ] {
        let mut args = vec!["-S", "-s", secret.to_str().unwrap(), "-m", "release.json"];
        args.extend_from_slice(flags);
        ok(minisign(&args, d.path()), "minisign -S");
        let sig = std::fs::read(d.path().join(release::SIGNATURE_FILE)).unwrap();
        let v = manifest::verify(&bytes, &sig, &trusted, policy(0)).unwrap();
        assert_eq!(v.signature_form(), Some(form), "{flags:?}");
        assert_eq!(
            v.key_id().unwrap().to_string(),
            a.id_as_minisign_prints_it()
        );
    }
}

#[test]
fn a_signature_by_an_untrusted_key_is_refused_and_its_key_id_named() {
    let (a, b) = keys();
    let (d, bytes, _) = written(3, &trust(&[a]), None);
    let secret = b.secret_path();
    ok(
        minisign(
            &["-S", "-s", secret.to_str().unwrap(), "-m", "release.json"],
            d.path(),
        ),
        "minisign -S with key B",
    );
    let sig = std::fs::read(d.path().join(release::SIGNATURE_FILE)).unwrap();
    let e = manifest::verify(&bytes, &sig, &trust(&[a]), policy(0)).unwrap_err();
    assert!(
        matches!(e, ManifestError::UnknownKeyId { key_id, .. } if key_id == b.trusted().id()),
        "{e:?}"
    );
    let msg = e.to_string();
    assert!(msg.contains(&b.id_as_minisign_prints_it()), "{msg}");
    assert!(msg.contains(&a.id_as_minisign_prints_it()), "{msg}");
    // Trusting both, it verifies.
    manifest::verify(&bytes, &sig, &trust(&[a, b]), policy(0)).unwrap();
}

#[test]
fn a_signed_release_must_be_trusted_by_its_own_image() {
    let (a, b) = keys();
    let e = release::check_signing(&trust(&[a]), Some(&b.signer())).unwrap_err();
    assert!(matches!(e, SigningError::SignerNotTrusted { .. }), "{e}");
    assert!(e.to_string().contains(&b.id_as_minisign_prints_it()), "{e}");
    let e = release::check_signing(&TrustedKeys::default(), Some(&a.signer())).unwrap_err();
    assert!(
        matches!(e, SigningError::SignedButTrustsNothing { .. }),
        "{e}"
    );
    // write_manifest refuses too, and writes nothing.
    let d = tempfile::tempdir().unwrap();
    let m = release::manifest(&a_release(0));
    assert!(release::write_manifest(d.path(), &m, &trust(&[a]), Some(&b.signer())).is_err());
    assert!(!d.path().join(release::MANIFEST_FILE).exists());
    release::check_signing(&trust(&[a, b]), Some(&b.signer())).unwrap();
    release::check_signing(&trust(&[a]), None).unwrap();
}

#[test]
fn an_encrypted_secret_key_is_refused_with_what_to_do() {
    let d = tempfile::tempdir().unwrap();
    let e = ReleaseSigner::parse("k.key", "untrusted comment: x\nnot a key\n").unwrap_err();
    assert!(e.to_string().contains("minisign -G -W"), "{e}");
    // What `minisign -G` (with a password) writes: scrypt as the KDF.
    let text = std::fs::read_to_string(keys().0.secret_path()).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut bin = base64::Engine::decode(&b64, text.lines().nth(1).unwrap()).unwrap();
    bin[2..4].copy_from_slice(b"Sc");
    let encrypted = format!(
        "untrusted comment: x\n{}\n",
        base64::Engine::encode(&b64, &bin)
    );
    std::fs::write(d.path().join("enc.key"), &encrypted).unwrap();
    let e = ReleaseSigner::from_file(&d.path().join("enc.key")).unwrap_err();
    assert!(matches!(e, SigningError::SecretKey { .. }), "{e}");
}

#[test]
fn an_unsigned_build_removes_a_stale_signature() {
    let (a, _) = keys();
    let d = tempfile::tempdir().unwrap();
    let m = release::manifest(&a_release(1));
    release::write_manifest(d.path(), &m, &trust(&[a]), Some(&a.signer())).unwrap();
    assert!(d.path().join(release::SIGNATURE_FILE).exists());
    release::write_manifest(d.path(), &m, &trust(&[a]), None).unwrap();
    assert!(!d.path().join(release::SIGNATURE_FILE).exists());
    let bytes = std::fs::read(d.path().join(release::MANIFEST_FILE)).unwrap();
    assert!(matches!(
        manifest::verify(&bytes, b"", &trust(&[a]), policy(0)),
        Err(ManifestError::MalformedSignature { .. })
    ));
    assert!(matches!(
        manifest::accept_unsigned(&bytes, &trust(&[a]), policy(0)),
        Err(ManifestError::Unsigned { .. })
    ));
}

#[test]
fn security_versions_lower_refused_equal_accepted_downgrade_allowed_and_flagged() {
    let (a, _) = keys();
    let trusted = trust(&[a]);
    let (_d, bytes, sig) = written(4, &trusted, Some(&a.signer()));
    let sig = sig.unwrap();
    assert_eq!(
        manifest::verify(&bytes, &sig, &trusted, policy(5)).unwrap_err(),
        ManifestError::Downgrade {
            running: 5,
            manifest: 4
        }
    );
    assert_eq!(
        manifest::verify(&bytes, &sig, &trusted, policy(4))
            .unwrap()
            .downgrade(),
        None
    );
    assert_eq!(
        manifest::verify(&bytes, &sig, &trusted, policy(0))
            .unwrap()
            .downgrade(),
        None
    );
    let allowed = Policy {
        running_security_version: 5,
        allow_downgrade: true,
    };
    let v = manifest::verify(&bytes, &sig, &trusted, allowed).unwrap();
    assert_eq!(
        v.downgrade(),
        Some(Downgrade {
            running: 5,
            manifest: 4
        })
    );
    // allow_downgrade does not excuse a bad signature.
    let mut altered = bytes.clone();
    let at = altered.len() / 2;
    altered[at] ^= 1;
    assert!(matches!(
        manifest::verify(&altered, &sig, &trusted, allowed),
        Err(ManifestError::BadSignature { .. })
    ));
    assert!(matches!(
        manifest::verify(&bytes, b"", &trusted, allowed),
        Err(ManifestError::MalformedSignature { .. })
    ));
}

#[test]
fn oversize_inputs_are_refused_before_parsing() {
    // A validly signed manifest that is too large: refused for its size, not for its
    // signature or its JSON (which are never looked at).
    let (a, _) = keys();
    let trusted = trust(&[a]);
    let big = vec![b' '; manifest::MAX_MANIFEST_BYTES + 1];
    let sig = a.signer().sign(&big, "big").unwrap();
    assert_eq!(
        manifest::verify(&big, sig.as_bytes(), &trusted, policy(0)).unwrap_err(),
        ManifestError::ManifestTooLarge {
            len: manifest::MAX_MANIFEST_BYTES + 1,
            max: manifest::MAX_MANIFEST_BYTES
        }
    );
    let (m, s) = signed_fixture();
    let mut huge_sig = s.clone();
    huge_sig.resize(manifest::MAX_SIGNATURE_BYTES + 1, b'\n');
    assert!(matches!(
        manifest::verify(m, &huge_sig, &trusted, policy(0)),
        Err(ManifestError::SignatureTooLarge { .. })
    ));
}

#[test]
fn the_untrusted_comment_is_outside_the_signature_but_its_prefix_is_checked() {
    // The minisign format signs everything but the untrusted comment's text; nothing reads it.
    let (a, _) = keys();
    let (m, s) = signed_fixture();
    let text = String::from_utf8(s.clone()).unwrap();
    let (_, rest) = text.split_once('\n').unwrap();
    let other = format!("untrusted comment: anything at all\n{rest}");
    manifest::verify(m, other.as_bytes(), &trust(&[a]), policy(0)).unwrap();
    let bad = text.replacen("untrusted", "unTrusted", 1);
    assert!(matches!(
        manifest::verify(m, bad.as_bytes(), &trust(&[a]), policy(0)),
        Err(ManifestError::MalformedSignature { .. })
    ));
}

fn replay(m: &[u8], s: &[u8]) -> String {
    format!(
        "\nkey:\n{}\nmanifest:\n{}\nsignature:\n{}",
        keys().0.public_text(),
        String::from_utf8_lossy(m),
        String::from_utf8_lossy(s)
    )
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 512,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    /// One byte changed anywhere in the manifest, or anywhere in the signature file after the
    /// untrusted comment's text (which minisign does not sign), is refused.
    #[test]
    fn one_changed_byte_is_refused(at in any::<prop::sample::Index>(), xor in 1u8..=255, in_sig in any::<bool>()) {
        let (a, _) = keys();
        let (m, s) = signed_fixture();
        let (mut m, mut s) = (m.clone(), s.clone());
        let comment_end = s.iter().position(|&b| b == b'\n').unwrap();
        let prefix = b"untrusted comment: ".len();
        if in_sig {
            // the prefix, the newline that ends the comment, and everything after it
            let signed: Vec<usize> = (0..prefix).chain(comment_end..s.len()).collect();
            s[signed[at.index(signed.len())]] ^= xor;
        } else {
            let i = at.index(m.len());
            m[i] ^= xor;
        }
        let r = manifest::verify(&m, &s, &trust(&[a]), policy(0));
        prop_assert!(r.is_err(), "accepted a changed {}:{}", if in_sig { "signature" } else { "manifest" }, replay(&m, &s));
    }

    /// A manifest or a signature cut short at any length is refused.
    #[test]
    fn truncation_is_refused(at in any::<prop::sample::Index>(), in_sig in any::<bool>()) {
        let (a, _) = keys();
        let (m, s) = signed_fixture();
        let (m, s) = if in_sig {
            (m.clone(), s[..at.index(s.len())].to_vec())
        } else {
            (m[..at.index(m.len())].to_vec(), s.clone())
        };
        let r = manifest::verify(&m, &s, &trust(&[a]), policy(0));
        prop_assert!(r.is_err(), "accepted a truncated {}:{}", if in_sig { "signature" } else { "manifest" }, replay(&m, &s));
    }
}
