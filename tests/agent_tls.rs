//! The agent's security over real TLS on loopback: mutual TLS refusals in the handshake, role
//! checks per RPC, and osctl's exit codes and messages for each kind of failure.
#![allow(clippy::unwrap_used, clippy::panic)]

mod agent_common;

use agent_common::{chain, start_node};
use keelos::agent::proto::{self, keel_client::KeelClient};
use keelos::pki::{self, Role, Validity};
use std::process::Command;
use tonic::Code;

fn install_req(url: &str, sha: &str) -> proto::InstallRequest {
    proto::InstallRequest {
        full_image_url: url.into(),
        sha256: sha.into(),
        version: "2.0".into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_reads_status_over_mtls() {
    let node = start_node().await;
    for role in Role::ALL {
        let s = node
            .client(role)
            .status(proto::StatusRequest {})
            .await
            .unwrap_or_else(|e| panic!("{role}: {}", chain(&e)))
            .into_inner();
        assert_eq!(s.slots.len(), 2);
        assert!(s.slots.iter().all(|x| x.state == "invalid" && !x.bootable));
        assert_eq!(s.booted_slot, "", "a fresh disk has no bootable slot");
    }
}

/// A gRPC call by a refused client fails at the connection, never with an answer from a handler.
fn assert_call_refused(r: Result<tonic::Response<proto::StatusReply>, tonic::Status>, what: &str) {
    let e = match r {
        Ok(_) => panic!("{what}: the agent answered a refused client"),
        Err(e) => e,
    };
    assert_ne!(
        e.code(),
        Code::PermissionDenied,
        "{what}: must fail in the handshake"
    );
    assert_ne!(
        e.code(),
        Code::InvalidArgument,
        "{what}: must fail in the handshake"
    );
}

/// The handshake itself, without gRPC: the server's alert reaches the client on its first read
/// (TLS 1.3 clients finish before the server has checked their certificate).
async fn raw_handshake(
    addr: std::net::SocketAddr,
    cfg: rustls::ClientConfig,
) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 64];
    match tls.read(&mut buf).await {
        Ok(0) => Err("closed without data".into()),
        Ok(_) => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

fn client_cfg(
    ca: &std::path::Path,
    cert: Option<(&std::path::Path, &std::path::Path)>,
) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for c in pki::load_certs(ca).unwrap() {
        roots.add(c).unwrap();
    }
    let b = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots);
    let mut cfg = match cert {
        None => b.with_no_client_auth(),
        Some((c, k)) => b
            .with_client_auth_cert(pki::load_certs(c).unwrap(), pki::load_key(k).unwrap())
            .unwrap(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_refuses_no_cert_other_ca_and_expired() {
    let node = start_node().await;

    let ca = node.pki.join(pki::CA_CERT);
    let other = tempfile::tempdir().unwrap();
    pki::generate(other.path(), &["localhost".into()], None).unwrap();
    let (oc, ok) = (
        other.path().join("admin.crt"),
        other.path().join("admin.key"),
    );
    let (ec, ek) = node.issue("expired", Role::Admin.organization(), Validity::expired());
    // Every KeelOS CA has the same name, so another CA's certificate fails on its signature
    // (DecryptError) rather than on an unknown issuer name.
    let cases: Vec<(&str, rustls::ClientConfig, &[&str])> = vec![
        (
            "no client certificate",
            client_cfg(&ca, None),
            &["certificaterequired"],
        ),
        (
            "certificate from another CA",
            client_cfg(&ca, Some((&oc, &ok))),
            &["unknownca", "decrypterror", "badcertificate"],
        ),
        (
            "expired certificate",
            client_cfg(&ca, Some((&ec, &ek))),
            &["certificateexpired"],
        ),
    ];
    for (what, cfg, alerts) in cases {
        let e = raw_handshake(node.addr, cfg.clone()).await.expect_err(what);
        let low = e.to_lowercase();
        assert!(
            low.contains("alert") && alerts.iter().any(|a| low.contains(a)),
            "{what}: {e}"
        );
        let ch =
            keelos::agent::tls::channel(&node.addr.to_string(), "localhost", cfg.into()).unwrap();
        assert_call_refused(
            KeelClient::new(ch).status(proto::StatusRequest {}).await,
            what,
        );
    }
    // The admin certificate from gen pki passes the same raw handshake.
    let (ac, ak) = node.role_paths(Role::Admin);
    raw_handshake(node.addr, client_cfg(&ca, Some((&ac, &ak))))
        .await
        .unwrap();

    // The same CA and validity but a current certificate works: the refusals above were the
    // certificates, not the set-up.
    let (c, k) = node.issue(
        "current",
        Role::Admin.organization(),
        Validity::days_from_now(1),
    );
    node.client_with(&c, &k)
        .status(proto::StatusRequest {})
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_are_enforced_with_the_needed_role_named() {
    let node = start_node().await;
    let before = node.disk_bytes();
    let good = "ab".repeat(32);

    // A reader calling install.
    let e = node
        .client(Role::Reader)
        .install_update(install_req("http://127.0.0.1:1/img", &good))
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{}", chain(&e));
    assert!(e.message().contains("keel:admin"), "{}", e.message());
    assert!(e.message().contains("keel:reader"), "{}", e.message());

    // An operator calling config apply.
    let e = node
        .client(Role::Operator)
        .apply_config(proto::ApplyConfigRequest {
            json: "{}".into(),
            dry_run: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{}", chain(&e));
    assert!(e.message().contains("keel:admin"), "{}", e.message());

    // An operator may not roll back or install; a reader may not reboot or restart services.
    let e = node
        .client(Role::Operator)
        .rollback(proto::RollbackRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = node
        .client(Role::Reader)
        .reboot(proto::RebootRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        e.message().contains("keel:admin or keel:operator"),
        "{}",
        e.message()
    );
    let e = node
        .client(Role::Reader)
        .service_restart(proto::ServiceRestartRequest { name: "x".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    // A certificate from the right CA whose Organization names no role: nothing allowed.
    let (c, k) = node.issue("norole", "someone-else", Validity::days_from_now(1));
    let e = node
        .client_with(&c, &k)
        .status(proto::StatusRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        e.message().contains("names no KeelOS role"),
        "{}",
        e.message()
    );

    // Operator is allowed through the role check for logs and service restart; the host has no
    // keel-init, so the answer is UNAVAILABLE with the reason.
    let e = node
        .client(Role::Operator)
        .service_list(proto::ServiceListRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert!(e.message().contains("--control"), "{}", e.message());

    assert!(
        node.disk_bytes() == before,
        "a refused call changed the disk"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_install_requests_are_refused_with_every_error_and_nothing_written() {
    let node = start_node().await;
    let before = node.disk_bytes();
    let mut c = node.client(Role::Admin);
    let cases: Vec<(proto::InstallRequest, Vec<&str>)> = vec![
        (
            install_req("", ""),
            vec!["sha256 is empty", "full_image_url is empty"],
        ),
        (
            install_req("http://127.0.0.1:1/img", "abc"),
            vec!["not 64 hexadecimal characters"],
        ),
        (
            install_req("http://127.0.0.1:1/img", &"g".repeat(64)),
            vec!["not 64 hexadecimal characters"],
        ),
        (
            install_req("ftp://127.0.0.1/img", &"ab".repeat(32)),
            vec!["unsupported scheme \"ftp\""],
        ),
        (
            install_req("http//missing-colon", &"ab".repeat(32)),
            vec!["full_image_url"],
        ),
        (
            proto::InstallRequest {
                is_delta: true,
                ..install_req("http://127.0.0.1:1/img", &"ab".repeat(32))
            },
            vec!["delta_url is empty"],
        ),
    ];
    for (req, wants) in cases {
        let e = c.install_update(req.clone()).await.map(|_| ()).unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{req:?}: {}", chain(&e));
        for w in wants {
            assert!(
                e.message().contains(w),
                "{req:?}: {:?} lacks {w:?}",
                e.message()
            );
        }
    }
    assert!(
        node.disk_bytes() == before,
        "a refused install changed the disk"
    );
}

fn osctl(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_osctl"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn osctl_async(args: Vec<String>) -> (i32, String, String) {
    tokio::task::spawn_blocking(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        osctl(&a)
    })
    .await
    .unwrap()
}

fn s(p: &std::path::Path) -> String {
    p.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn osctl_exit_codes_and_messages() {
    let node = start_node().await;
    let (ac, ak) = node.role_paths(Role::Admin);
    let admin = node.osctl_config(&ac, &ak);
    let (rc, rk) = node.role_paths(Role::Reader);
    let reader = node.osctl_config(&rc, &rk);

    // status as text and as JSON
    let (code, out, err) = osctl_async(vec!["--config".into(), s(&admin), "status".into()]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("slot a"), "{out}");
    assert!(out.contains("\nkernel: "), "{out}");
    assert!(out.contains("\nboot stage: unknown\n"), "{out}");
    assert!(!out.contains("last rollback"), "{out}");
    // a rollback in the boot journal on STATE: shown in both outputs
    let state = node.dir.path().join("state");
    let mut j = keelos::control::journal::Journal::default();
    j.begin(keelos::control::journal::BootFacts {
        slot: "a".into(),
        fallback_from: Some("b".into()),
        ..Default::default()
    });
    j.save(&keelos::control::journal::journal_path(&state))
        .unwrap();
    let (code, out, err) = osctl_async(vec!["--config".into(), s(&admin), "status".into()]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("\nlast rollback: slot b: none of its trial boots reached"),
        "{out}"
    );
    let (code, out, err) = osctl_async(vec![
        "--config".into(),
        s(&admin),
        "--output".into(),
        "json".into(),
        "status".into(),
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["slots"].as_array().unwrap().len(), 2);
    assert!(!v["kernel_release"].as_str().unwrap().is_empty(), "{v}");
    assert_eq!(v["boot_stage"], "");
    assert!(
        v["last_rollback"]
            .as_str()
            .unwrap()
            .starts_with("slot b: none of its trial boots"),
        "{v}"
    );
    for key in [
        "os_version",
        "booted_slot",
        "rolled_back",
        "uptime_seconds",
        "update",
    ] {
        assert!(v.get(key).is_some(), "{key} missing from {v}");
    }

    // denied role: exit 5, one line naming the role needed
    let (code, _, err) = osctl_async(vec![
        "--config".into(),
        s(&reader),
        "install".into(),
        "--image".into(),
        "http://127.0.0.1:1/x".into(),
        "--sha256".into(),
        "ab".repeat(32),
    ])
    .await;
    assert_eq!(code, 5, "{err}");
    assert!(
        err.contains("permission denied") && err.contains("keel:admin"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    // expired certificate: exit 4 with a hint
    let (ec, ek) = node.issue("old", Role::Admin.organization(), Validity::expired());
    let expired = node.osctl_config(&ec, &ek);
    let (code, _, err) = osctl_async(vec!["--config".into(), s(&expired), "status".into()]).await;
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("TLS failure") && err.contains("hint"), "{err}");

    // unreachable agent: exit 3
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_addr = dead.local_addr().unwrap().to_string();
    drop(dead);
    let (code, _, err) = osctl_async(vec![
        "--config".into(),
        s(&admin),
        "--endpoint".into(),
        dead_addr,
        "status".into(),
    ])
    .await;
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("cannot reach"), "{err}");

    // services on a host: the agent's reason, exit 1
    let (code, _, err) = osctl_async(vec!["--config".into(), s(&admin), "services".into()]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("without --control"), "{err}");

    // a missing config file is a usage error
    let (code, _, err) = osctl_async(vec![
        "--config".into(),
        "/nonexistent/osctl.json".into(),
        "status".into(),
    ])
    .await;
    assert_eq!(code, 2, "{err}");
}

#[test]
fn osctl_gen_pki_writes_a_working_layout() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("p");
    let (code, stdout, err) = osctl(&[
        "gen",
        "pki",
        "--out",
        &s(&out),
        "--san",
        "node1.example",
        "--san",
        "127.0.0.1",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("keel:operator"), "{stdout}");
    use std::os::unix::fs::PermissionsExt;
    for k in [
        "ca.key",
        "agent.key",
        "admin.key",
        "operator.key",
        "reader.key",
    ] {
        let m = std::fs::metadata(out.join(k)).unwrap().permissions().mode() & 0o777;
        assert_eq!(m, 0o600, "{k}");
    }
    let cfg = pki::ClientConfig::load(&out.join("osctl.json")).unwrap();
    assert_eq!(cfg.endpoint, "node1.example:50051");
    // again into the same directory: refused, the CA is kept
    let ca_before = std::fs::read(out.join("ca.crt")).unwrap();
    let (code, _, err) = osctl(&["gen", "pki", "--out", &s(&out), "--san", "x"]);
    assert_eq!(code, 2, "{err}");
    assert_eq!(std::fs::read(out.join("ca.crt")).unwrap(), ca_before);
}
