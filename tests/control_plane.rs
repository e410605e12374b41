//! A real control plane on loopback (stock etcd, kube-apiserver and kube-controller-manager from
//! `image/kube/build`), driven with kube-rs: the admin sees the system namespaces, a bootstrap
//! token gets a node client certificate approved and signed by the controller-manager exactly as
//! kubelet TLS bootstrapping does, and a wrong token is refused.

use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestSpec,
};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::ByteString;
use keelos::cluster::{ControlPlane, Options, COMPONENTS};
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use x509_parser::prelude::*;

const NODE: &str = "test-node";

/// Build the binaries with `image/kube/build` when they are missing (about 9 minutes cold).
fn ensure_binaries(opts: &Options) {
    if opts.binaries().is_ok() {
        return;
    }
    let build = Path::new(env!("CARGO_MANIFEST_DIR")).join("image/kube/build");
    eprintln!("building {COMPONENTS:?} with {}", build.display());
    let t = Instant::now();
    let status = Command::new(&build)
        .args(COMPONENTS)
        .status()
        .expect("running image/kube/build");
    assert!(
        status.success(),
        "image/kube/build {COMPONENTS:?}: {status}"
    );
    eprintln!(
        "timing: image/kube/build: {:.1} s",
        t.elapsed().as_secs_f64()
    );
    opts.binaries().expect("binaries after image/kube/build");
}

fn node_csr() -> String {
    let key = KeyPair::generate().expect("key");
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("system:node:{NODE}"));
    dn.push(DnType::OrganizationName, "system:nodes");
    p.distinguished_name = dn;
    p.serialize_request(&key)
        .expect("csr")
        .pem()
        .expect("csr pem")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_bootstraps_a_node_client_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = Options::new(dir.path().join("cluster"));
    ensure_binaries(&opts);

    let t0 = Instant::now();
    let cp = match ControlPlane::start(&opts).await {
        Ok(cp) => cp,
        Err(e) => panic!("starting the control plane: {e}"),
    };
    let t = cp.timings;
    eprintln!(
        "timing: control plane: API ready {:.1} s, bootstrap objects {:.1} s, controllers {:.1} s \
         (start() returned after {:.1} s)",
        t.api_ready.as_secs_f64(),
        t.bootstrapped.as_secs_f64(),
        t.controllers.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    for (name, kib) in cp.rss_kib() {
        eprintln!("rss: {name}: {} MiB", kib / 1024);
    }

    // The admin (system:masters, client certificate) sees the system namespaces.
    let admin = cp.admin_client().await.expect("admin client");
    let ns: Api<Namespace> = Api::all(admin.clone());
    let names: Vec<String> = ns
        .list(&ListParams::default())
        .await
        .expect("listing namespaces")
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect();
    for want in ["default", "kube-system"] {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }

    // kubeadm join's discovery: kube-public/cluster-info, readable without credentials, signed
    // for the token by the bootstrapsigner controller.
    let jws = format!("jws-kubeconfig-{}", cp.token.id());
    let t1 = Instant::now();
    let info = loop {
        let cm = Api::<ConfigMap>::namespaced(admin.clone(), "kube-public")
            .get("cluster-info")
            .await
            .expect("kube-public/cluster-info");
        let data = cm.data.unwrap_or_default();
        if data.contains_key(&jws) {
            break data;
        }
        assert!(
            t1.elapsed() < Duration::from_secs(60),
            "cluster-info not signed ({jws}) after 60 s: keys {:?}",
            data.keys().collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let kc = info.get("kubeconfig").expect("cluster-info kubeconfig");
    assert!(
        kc.contains(&format!(
            "server: https://10.0.2.100:{}",
            cp.ports.apiserver
        )),
        "{kc}"
    );

    // A wrong token is not a user at all.
    let wrong = cp
        .token_client("abcdef.0000000000000000")
        .await
        .expect("client with a wrong token");
    match Api::<Namespace>::all(wrong)
        .list(&ListParams::default())
        .await
    {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 401, "wrong token: {s:?}"),
        other => panic!("a wrong bootstrap token was not refused with 401: {other:?}"),
    }

    // As kubelet does with --bootstrap-kubeconfig: the bootstrap token asks for a client
    // certificate for its node; the csrapproving controller approves it, csrsigning signs it.
    let bootstrap = cp
        .token_client(&cp.token.to_string())
        .await
        .expect("bootstrap client");
    let csrs: Api<CertificateSigningRequest> = Api::all(bootstrap);
    let csr = CertificateSigningRequest {
        metadata: ObjectMeta {
            name: Some(format!("node-csr-{NODE}")),
            ..ObjectMeta::default()
        },
        spec: CertificateSigningRequestSpec {
            request: ByteString(node_csr().into_bytes()),
            signer_name: "kubernetes.io/kube-apiserver-client-kubelet".into(),
            usages: Some(vec!["digital signature".into(), "client auth".into()]),
            ..CertificateSigningRequestSpec::default()
        },
        status: None,
    };
    let t1 = Instant::now();
    let created = csrs
        .create(&PostParams::default(), &csr)
        .await
        .expect("creating the CSR with the bootstrap token");
    let user = created.spec.username.clone().unwrap_or_default();
    assert_eq!(user, format!("system:bootstrap:{}", cp.token.id()));

    let name = format!("node-csr-{NODE}");
    let (approved, pem) = loop {
        let c = csrs.get(&name).await.expect("reading the CSR back");
        let status = c.status.unwrap_or_default();
        let approved = status
            .conditions
            .unwrap_or_default()
            .into_iter()
            .find(|c| c.type_ == "Approved" && c.status == "True");
        if let (Some(a), Some(cert)) = (approved.clone(), status.certificate) {
            break (a, cert.0);
        }
        assert!(
            t1.elapsed() < Duration::from_secs(60),
            "CSR not approved and signed after 60 s (approved: {approved:?}); see {}",
            cp.layout.log_dir().display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!(
        "timing: CSR approved and signed in {:.1} s (reason {:?})",
        t1.elapsed().as_secs_f64(),
        approved.reason
    );
    assert_eq!(approved.reason.as_deref(), Some("AutoApproved"));

    let (_, cert_pem) = parse_x509_pem(&pem).expect("issued certificate is PEM");
    let cert = cert_pem.parse_x509().expect("issued certificate parses");
    let ca_file = std::fs::read(cp.layout.pki.ca_cert()).expect("ca.crt");
    let (_, ca_pem) = parse_x509_pem(&ca_file).expect("ca PEM");
    let ca = ca_pem.parse_x509().expect("ca parses");
    cert.verify_signature(Some(ca.public_key()))
        .expect("node certificate signed by the cluster CA");
    assert_eq!(cert.issuer(), ca.subject());
    let cn: Vec<_> = cert
        .subject()
        .iter_common_name()
        .filter_map(|a| a.as_str().ok())
        .collect();
    assert_eq!(cn, vec![format!("system:node:{NODE}")]);
    let org: Vec<_> = cert
        .subject()
        .iter_organization()
        .filter_map(|a| a.as_str().ok())
        .collect();
    assert_eq!(org, vec!["system:nodes"]);
    drop(cp);
}
