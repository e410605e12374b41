//! The control plane's PKI: one cluster CA and the certificates and keys the components and
//! the admin use. Host side only; the files are written once into `DIR/pki` and reused.

use super::ClusterError;
use crate::pki::write_file;
use rcgen::{
    CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use time::{Duration, OffsetDateTime};

/// The first address of `--service-cluster-ip-range=10.96.0.0/12`: the `kubernetes` service.
pub const SERVICE_IP: &str = "10.96.0.1";
/// The address QEMU guests reach host services at (a `guestfwd` of user networking).
pub const GUEST_HOST_IP: &str = "10.0.2.100";

/// The files of a cluster PKI directory, each `<name>.crt` + `<name>.key` except `sa.*`.
#[derive(Debug, Clone)]
pub struct ClusterPki {
    pub dir: PathBuf,
}

/// Certificates issued by the cluster CA: (file stem, CN, O, server?).
const LEAVES: &[(&str, &str, Option<&str>, bool)] = &[
    ("apiserver", "kube-apiserver", None, true),
    (
        "apiserver-kubelet-client",
        "kube-apiserver-kubelet-client",
        Some("system:masters"),
        false,
    ),
    ("admin", "kubernetes-admin", Some("system:masters"), false),
    (
        "controller-manager",
        "system:kube-controller-manager",
        None,
        false,
    ),
];

fn gen_err(what: &str) -> impl FnOnce(rcgen::Error) -> ClusterError + '_ {
    move |e| ClusterError::Pki(format!("generating {what}: {e}"))
}

impl ClusterPki {
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
    pub fn cert(&self, stem: &str) -> PathBuf {
        self.dir.join(format!("{stem}.crt"))
    }
    pub fn key(&self, stem: &str) -> PathBuf {
        self.dir.join(format!("{stem}.key"))
    }
    /// The service-account signing key (private) and its public half.
    pub fn sa_key(&self) -> PathBuf {
        self.dir.join("sa.key")
    }
    pub fn sa_pub(&self) -> PathBuf {
        self.dir.join("sa.pub")
    }

    fn all_files(&self) -> Vec<PathBuf> {
        let mut v = vec![self.ca_cert(), self.ca_key(), self.sa_key(), self.sa_pub()];
        for (stem, ..) in LEAVES {
            v.push(self.cert(stem));
            v.push(self.key(stem));
        }
        v
    }

    /// Use the PKI in `dir` when it is complete, make a new one when `dir` holds none; a
    /// partial PKI is an error (never overwrite a CA that nodes may already trust).
    pub fn load_or_generate(dir: &Path) -> Result<ClusterPki, ClusterError> {
        let pki = ClusterPki {
            dir: dir.to_path_buf(),
        };
        let files = pki.all_files();
        let present: Vec<&PathBuf> = files.iter().filter(|p| p.exists()).collect();
        if present.len() == files.len() {
            return Ok(pki);
        }
        if !present.is_empty() {
            let missing: Vec<String> = files
                .iter()
                .filter(|p| !p.exists())
                .map(|p| p.display().to_string())
                .collect();
            return Err(ClusterError::Pki(format!(
                "{} holds a partial PKI (missing {}); remove the directory to start a new cluster",
                dir.display(),
                missing.join(", ")
            )));
        }
        std::fs::create_dir_all(dir).map_err(|e| ClusterError::io("creating", dir, e))?;
        pki.generate()?;
        Ok(pki)
    }

    fn generate(&self) -> Result<(), ClusterError> {
        let now = OffsetDateTime::now_utc();
        let (not_before, not_after) = (now - Duration::hours(1), now + Duration::days(3650));
        let ca_key = KeyPair::generate().map_err(gen_err("cluster CA key"))?;
        let mut ca =
            crate::pki::ca_params_named("kubernetes", None).map_err(gen_err("cluster CA"))?;
        ca.not_before = not_before;
        ca.not_after = not_after;
        let ca_cert = ca.self_signed(&ca_key).map_err(gen_err("cluster CA"))?;
        let issuer = Issuer::from_params(&ca, &ca_key);
        for (stem, cn, org, server) in LEAVES {
            let mut p = CertificateParams::new(Vec::<String>::new()).map_err(gen_err(stem))?;
            p.distinguished_name.push(DnType::CommonName, *cn);
            if let Some(o) = org {
                p.distinguished_name.push(DnType::OrganizationName, *o);
            }
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            if *server {
                p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
                p.subject_alt_names = apiserver_sans()?;
            } else {
                p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            }
            p.not_before = not_before;
            p.not_after = now + Duration::days(365);
            let key = KeyPair::generate().map_err(gen_err(stem))?;
            let cert = p.signed_by(&key, &issuer).map_err(gen_err(stem))?;
            self.write(&self.key(stem), &key.serialize_pem(), true)?;
            self.write(&self.cert(stem), &cert.pem(), false)?;
        }
        let sa = KeyPair::generate().map_err(gen_err("service-account key"))?;
        self.write(&self.sa_key(), &sa.serialize_pem(), true)?;
        self.write(&self.sa_pub(), &sa.public_key_pem(), false)?;
        // The CA certificate last: its presence is what marks the PKI complete.
        self.write(&self.ca_key(), &ca_key.serialize_pem(), true)?;
        self.write(&self.ca_cert(), &ca_cert.pem(), false)?;
        Ok(())
    }

    fn write(&self, path: &Path, data: &str, private: bool) -> Result<(), ClusterError> {
        write_file(path, data, private).map_err(|e| ClusterError::Pki(e.to_string()))
    }
}

/// The names and addresses the API server answers as: loopback for host tools, the
/// in-cluster service names and IP for pods, and the guestfwd address for QEMU nodes.
pub fn apiserver_sans() -> Result<Vec<SanType>, ClusterError> {
    let mut sans = Vec::new();
    for ip in ["127.0.0.1", "::1", SERVICE_IP, GUEST_HOST_IP] {
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| ClusterError::Pki(format!("bad SAN address {ip}")))?;
        sans.push(SanType::IpAddress(ip));
    }
    for name in [
        "localhost",
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
    ] {
        let n = name
            .try_into()
            .map_err(|e| ClusterError::Pki(format!("bad SAN name {name}: {e}")))?;
        sans.push(SanType::DnsName(n));
    }
    Ok(sans)
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::*;

    #[test]
    fn generates_a_complete_pki_and_reuses_it() {
        let d = tempfile::tempdir().expect("tempdir");
        let pki = ClusterPki::load_or_generate(d.path()).expect("generate");
        let ca_before = std::fs::read(pki.ca_cert()).expect("ca");
        let again = ClusterPki::load_or_generate(d.path()).expect("reuse");
        assert_eq!(std::fs::read(again.ca_cert()).expect("ca"), ca_before);

        let pem = std::fs::read(pki.cert("apiserver")).expect("apiserver.crt");
        let (_, pem) = parse_x509_pem(&pem).expect("pem");
        let cert = pem.parse_x509().expect("x509");
        let san = cert
            .subject_alternative_name()
            .expect("ext")
            .expect("san present");
        let text = format!("{:?}", san.value.general_names);
        for want in ["kubernetes.default.svc", "localhost"] {
            assert!(text.contains(want), "{want} missing from {text}");
        }
        let ips: Vec<_> = san
            .value
            .general_names
            .iter()
            .filter_map(|g| match g {
                GeneralName::IPAddress(b) => Some(b.to_vec()),
                _ => None,
            })
            .collect();
        assert!(ips.contains(&vec![10, 96, 0, 1]), "{ips:?}");
        assert!(ips.contains(&vec![10, 0, 2, 100]), "{ips:?}");
        assert!(ips.contains(&vec![127, 0, 0, 1]), "{ips:?}");

        let admin = std::fs::read(pki.cert("admin")).expect("admin.crt");
        let (_, pem) = parse_x509_pem(&admin).expect("pem");
        let cert = pem.parse_x509().expect("x509");
        let org: Vec<_> = cert
            .subject()
            .iter_organization()
            .filter_map(|o| o.as_str().ok())
            .collect();
        assert_eq!(org, vec!["system:masters"]);
    }

    #[test]
    fn a_partial_pki_is_refused() {
        let d = tempfile::tempdir().expect("tempdir");
        let pki = ClusterPki::load_or_generate(d.path()).expect("generate");
        std::fs::remove_file(pki.sa_key()).expect("rm");
        let err = ClusterPki::load_or_generate(d.path()).expect_err("partial");
        assert!(err.to_string().contains("sa.key"), "{err}");
    }
}
