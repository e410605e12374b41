//! The agent's PKI: the CA, the agent's server certificate, one client certificate per role,
//! and the roles themselves.
//!
//! This module owns making certificates (`osctl gen pki`), loading them for rustls, and reading
//! a client's role from its verified certificate's Organization. It never decides what a role
//! may do (that is the one table in `agent::roles`) and never verifies a chain itself: rustls'
//! WebPKI verifier does that before a role is ever read.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use time::{Duration, OffsetDateTime};

/// The Common Name of every KeelOS CA; the CA is identified by its key, not its name.
const CA_CN: &str = "KeelOS node CA";
/// The default port of the agent, used for the endpoint written into osctl's config file.
pub const AGENT_PORT: u16 = 50051;

/// File names inside a PKI directory. The agent reads the first three (on a node, from
/// /state/pki); the rest are for operators.
pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
pub const AGENT_CERT: &str = "agent.crt";
pub const AGENT_KEY: &str = "agent.key";
/// osctl's configuration (admin role); `osctl-operator.json` and `osctl-reader.json` beside it.
pub const OSCTL_CONFIG: &str = "osctl.json";

/// A caller's role, carried in the Organization of its client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything.
    Admin,
    /// Reboot, service restart, logs, status.
    Operator,
    /// Status, logs, config get.
    Reader,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Admin, Role::Operator, Role::Reader];

    /// The Organization value that grants the role.
    pub fn organization(self) -> &'static str {
        match self {
            Role::Admin => "keel:admin",
            Role::Operator => "keel:operator",
            Role::Reader => "keel:reader",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Reader => "reader",
        }
    }

    pub fn from_organization(o: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.organization() == o)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.organization())
    }
}

/// Making, writing or loading certificates failed.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("certificate generation failed for {what}: {source}")]
    Generate {
        what: String,
        #[source]
        source: rcgen::Error,
    },
    #[error(
        "{path} holds no usable {what} (PEM expected); regenerate the PKI with `osctl gen pki`"
    )]
    BadPem { path: PathBuf, what: &'static str },
    #[error("subject alternative name {san:?} is neither a DNS name nor an IP address")]
    BadSan { san: String },
    #[error("at least one --san is needed: the name or address osctl uses to reach the agent")]
    NoSan,
    #[error(
        "{dir} already holds a PKI ({file} exists); remove it or choose another --out, so that \
         a working CA is never overwritten by accident"
    )]
    Exists { dir: PathBuf, file: &'static str },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> PkiError + 'a {
    move |source| PkiError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

fn gen_err(what: impl Into<String>) -> impl FnOnce(rcgen::Error) -> PkiError {
    let what = what.into();
    move |source| PkiError::Generate { what, source }
}

/// osctl's configuration file: where the agent is and which certificates to use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientConfig {
    /// host:port of the agent.
    pub endpoint: String,
    /// The CA that signed the agent's certificate.
    pub ca: PathBuf,
    /// The client certificate (its Organization is the role) and key.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The name checked against the agent's certificate; the endpoint's host when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
}

impl ClientConfig {
    pub fn load(path: &Path) -> Result<ClientConfig, PkiError> {
        let text = std::fs::read_to_string(path).map_err(io("reading osctl config", path))?;
        let mut c: ClientConfig = serde_json::from_str(&text).map_err(|e| PkiError::Io {
            what: "parsing osctl config",
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })?;
        // Relative paths are relative to the config file, so a PKI directory can be moved.
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [&mut c.ca, &mut c.cert, &mut c.key] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(c)
    }
}

/// The CA: its parameters (for issuing) and its key.
#[derive(Debug)]
pub struct Ca {
    params: CertificateParams,
    key: KeyPair,
    cert_pem: String,
}

fn ca_params() -> Result<CertificateParams, PkiError> {
    ca_params_named(CA_CN, Some("KeelOS")).map_err(gen_err("CA"))
}

/// A CA's parameters: its name, and the usages of a CA that signs leaves only (path length 0).
pub(crate) fn ca_params_named(
    cn: &str,
    org: Option<&str>,
) -> Result<CertificateParams, rcgen::Error> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    if let Some(o) = org {
        dn.push(DnType::OrganizationName, o);
    }
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(p)
}

/// A validity window: from `not_before` to `not_after`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From an hour ago (clock skew) for `days` days.
    pub fn days_from_now(days: i64) -> Validity {
        let now = OffsetDateTime::now_utc();
        Validity {
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(days),
        }
    }
    /// A window that ended yesterday: for testing that expired certificates are refused.
    pub fn expired() -> Validity {
        let now = OffsetDateTime::now_utc();
        Validity {
            not_before: now - Duration::days(30),
            not_after: now - Duration::days(1),
        }
    }
}

/// A certificate and its private key, PEM encoded.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Ca {
    /// A new CA valid for ten years.
    pub fn generate() -> Result<Ca, PkiError> {
        let key = KeyPair::generate().map_err(gen_err("CA key"))?;
        let mut params = ca_params()?;
        let v = Validity::days_from_now(3650);
        params.not_before = v.not_before;
        params.not_after = v.not_after;
        let cert = params.self_signed(&key).map_err(gen_err("CA"))?;
        Ok(Ca {
            params,
            key,
            cert_pem: cert.pem(),
        })
    }

    /// Load a CA written by [`generate`]: the issuer is the CA's name and key, which is all a
    /// verifier matches a child certificate against.
    pub fn load(dir: &Path) -> Result<Ca, PkiError> {
        let key_path = dir.join(CA_KEY);
        let cert_path = dir.join(CA_CERT);
        let key_pem = std::fs::read_to_string(&key_path).map_err(io("reading", &key_path))?;
        let cert_pem = std::fs::read_to_string(&cert_path).map_err(io("reading", &cert_path))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|_| PkiError::BadPem {
            path: key_path.clone(),
            what: "private key",
        })?;
        Ok(Ca {
            params: ca_params()?,
            key,
            cert_pem,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The agent's server certificate with the given subject alternative names.
    pub fn issue_agent(&self, sans: &[String], v: Validity) -> Result<Issued, PkiError> {
        for s in sans {
            let ok = s.parse::<std::net::IpAddr>().is_ok()
                || rustls_pki_types::DnsName::try_from(s.as_str()).is_ok();
            if !ok {
                return Err(PkiError::BadSan { san: s.clone() });
            }
        }
        let mut p = CertificateParams::new(sans.to_vec()).map_err(gen_err("agent"))?;
        p.distinguished_name.push(DnType::CommonName, "keel-agent");
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        self.sign(p, v, "agent certificate")
    }

    /// A client certificate whose Organization is `organization` (normally a role's).
    pub fn issue_client(
        &self,
        common_name: &str,
        organization: &str,
        v: Validity,
    ) -> Result<Issued, PkiError> {
        let mut p = CertificateParams::new(Vec::<String>::new()).map_err(gen_err("client"))?;
        p.distinguished_name
            .push(DnType::CommonName, common_name.to_string());
        p.distinguished_name
            .push(DnType::OrganizationName, organization.to_string());
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        self.sign(p, v, format!("client certificate {common_name}"))
    }

    fn sign(
        &self,
        mut p: CertificateParams,
        v: Validity,
        what: impl Into<String>,
    ) -> Result<Issued, PkiError> {
        let what = what.into();
        p.not_before = v.not_before;
        p.not_after = v.not_after;
        let key = KeyPair::generate().map_err(gen_err(what.clone()))?;
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = p.signed_by(&key, &issuer).map_err(gen_err(what))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Write `data` to `path`, with mode 0600 when `private` (created so from the start: the key is
/// never readable by others, not even for an instant).
pub fn write_file(path: &Path, data: &str, private: bool) -> Result<(), PkiError> {
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    o.mode(if private { 0o600 } else { 0o644 });
    let mut f = o.open(path).map_err(io("creating", path))?;
    f.write_all(data.as_bytes()).map_err(io("writing", path))?;
    f.sync_all().map_err(io("syncing", path))?;
    if private {
        // An existing file keeps its old mode through open(): set it explicitly.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(io("setting mode 0600 on", path))?;
    }
    Ok(())
}

/// What `osctl gen pki` wrote.
#[derive(Debug, Clone)]
pub struct Generated {
    pub dir: PathBuf,
    pub files: Vec<PathBuf>,
    /// osctl config per role.
    pub configs: Vec<(Role, PathBuf)>,
}

/// Make a whole PKI in `out`: CA, agent certificate (with `sans`), one client certificate per
/// role, and an osctl config per role (`osctl.json` is the admin's). The endpoint written in the
/// configs is `endpoint`, or the first SAN on port 50051.
pub fn generate(
    out: &Path,
    sans: &[String],
    endpoint: Option<&str>,
) -> Result<Generated, PkiError> {
    if sans.is_empty() {
        return Err(PkiError::NoSan);
    }
    for f in [CA_KEY, CA_CERT, AGENT_KEY] {
        if out.join(f).exists() {
            return Err(PkiError::Exists {
                dir: out.to_path_buf(),
                file: f,
            });
        }
    }
    std::fs::create_dir_all(out).map_err(io("creating directory", out))?;
    let ca = Ca::generate()?;
    let agent = ca.issue_agent(sans, Validity::days_from_now(3650))?;
    let mut files = Vec::new();
    let mut put = |name: &str, data: &str, private: bool| -> Result<(), PkiError> {
        let p = out.join(name);
        write_file(&p, data, private)?;
        files.push(p);
        Ok(())
    };
    put(CA_CERT, ca.cert_pem(), false)?;
    put(CA_KEY, &ca.key.serialize_pem(), true)?;
    put(AGENT_CERT, &agent.cert_pem, false)?;
    put(AGENT_KEY, &agent.key_pem, true)?;
    let endpoint = match endpoint {
        Some(e) => e.to_string(),
        None => host_port(&sans[0], AGENT_PORT),
    };
    let mut configs = Vec::new();
    for role in Role::ALL {
        let c = ca.issue_client(
            &format!("osctl-{}", role.name()),
            role.organization(),
            Validity::days_from_now(365),
        )?;
        let (crt, key) = (
            format!("{}.crt", role.name()),
            format!("{}.key", role.name()),
        );
        put(&crt, &c.cert_pem, false)?;
        put(&key, &c.key_pem, true)?;
        let cfg = ClientConfig {
            endpoint: endpoint.clone(),
            ca: PathBuf::from(CA_CERT),
            cert: PathBuf::from(&crt),
            key: PathBuf::from(&key),
            server_name: None,
        };
        let name = match role {
            Role::Admin => OSCTL_CONFIG.to_string(),
            r => format!("osctl-{}.json", r.name()),
        };
        let text = serde_json::to_string_pretty(&cfg).unwrap_or_default() + "\n";
        // The config names a private key: keep it private too.
        put(&name, &text, true)?;
        configs.push((role, out.join(&name)));
    }
    Ok(Generated {
        dir: out.to_path_buf(),
        files,
        configs,
    })
}

/// `host:port`, bracketing IPv6 addresses.
pub fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Read every certificate in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let data = std::fs::read(path).map_err(io("reading", path))?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<_, _>>()
        .map_err(|_| PkiError::BadPem {
            path: path.to_path_buf(),
            what: "certificate",
        })?;
    if certs.is_empty() {
        return Err(PkiError::BadPem {
            path: path.to_path_buf(),
            what: "certificate",
        });
    }
    Ok(certs)
}

/// Read the private key in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, PkiError> {
    let data = std::fs::read(path).map_err(io("reading", path))?;
    PrivateKeyDer::from_pem_slice(&data).map_err(|_| PkiError::BadPem {
        path: path.to_path_buf(),
        what: "private key",
    })
}

/// The role granted by a (verified) client certificate: the first Organization that names a
/// KeelOS role. `None` when the certificate does not parse or names no role.
pub fn role_of(cert: &CertificateDer<'_>) -> Option<Role> {
    let (_, c) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let role = c
        .subject()
        .iter_organization()
        .filter_map(|o| o.as_str().ok())
        .find_map(Role::from_organization);
    role
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn generate_writes_everything_with_private_keys_0600() {
        let d = tempfile::tempdir().expect("tempdir");
        let out = d.path().join("pki");
        let g =
            generate(&out, &["node1.example".into(), "127.0.0.1".into()], None).expect("generate");
        for f in [
            CA_CERT,
            CA_KEY,
            AGENT_CERT,
            AGENT_KEY,
            "admin.key",
            "reader.crt",
        ] {
            assert!(g.files.contains(&out.join(f)), "{f} missing");
        }
        for f in [CA_KEY, AGENT_KEY, "admin.key", "operator.key", "reader.key"] {
            let m = std::fs::metadata(out.join(f))
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(m & 0o777, 0o600, "{f} has mode {:o}", m & 0o777);
        }
        let cfg = ClientConfig::load(&out.join(OSCTL_CONFIG)).expect("config");
        assert_eq!(cfg.endpoint, "node1.example:50051");
        assert_eq!(cfg.cert, out.join("admin.crt"));
        // every role certificate carries its role
        for r in Role::ALL {
            let c = load_certs(&out.join(format!("{}.crt", r.name()))).expect("cert");
            assert_eq!(role_of(&c[0]), Some(r));
        }
        // the agent certificate names no role
        let a = load_certs(&out.join(AGENT_CERT)).expect("agent cert");
        assert_eq!(role_of(&a[0]), None);
        load_key(&out.join(AGENT_KEY)).expect("agent key");
        // a second run refuses to overwrite the CA
        assert!(matches!(
            generate(&out, &["x".into()], None),
            Err(PkiError::Exists { .. })
        ));
    }

    #[test]
    fn agent_cert_has_the_sans() {
        let ca = Ca::generate().expect("ca");
        let i = ca
            .issue_agent(
                &["node1.example".into(), "10.0.0.7".into()],
                Validity::days_from_now(1),
            )
            .expect("issue");
        let der = CertificateDer::from_pem_slice(i.cert_pem.as_bytes()).expect("pem");
        let (_, c) = x509_parser::parse_x509_certificate(der.as_ref()).expect("parse");
        let san = c
            .subject_alternative_name()
            .expect("ext")
            .expect("san present");
        let names: Vec<String> = san
            .value
            .general_names
            .iter()
            .map(|n| format!("{n}"))
            .collect();
        assert!(
            names.iter().any(|n| n.contains("node1.example")),
            "{names:?}"
        );
        let ip = san.value.general_names.iter().any(|n| {
            matches!(n, x509_parser::extensions::GeneralName::IPAddress(b) if *b == [10, 0, 0, 7])
        });
        assert!(ip, "{names:?}");
    }

    #[test]
    fn bad_input_is_refused() {
        let d = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            generate(d.path(), &[], None),
            Err(PkiError::NoSan)
        ));
        let ca = Ca::generate().expect("ca");
        assert!(matches!(
            ca.issue_agent(&["bad name!".into()], Validity::days_from_now(1)),
            Err(PkiError::BadSan { .. })
        ));
        let junk = d.path().join("junk.pem");
        std::fs::write(&junk, "not pem").expect("write");
        assert!(matches!(load_certs(&junk), Err(PkiError::BadPem { .. })));
        assert!(matches!(load_key(&junk), Err(PkiError::BadPem { .. })));
    }

    #[test]
    fn loaded_ca_issues_certs_the_original_verifies() {
        let d = tempfile::tempdir().expect("tempdir");
        generate(d.path(), &["localhost".into()], None).expect("generate");
        let ca = Ca::load(d.path()).expect("load");
        let c = ca
            .issue_client(
                "late",
                Role::Reader.organization(),
                Validity::days_from_now(1),
            )
            .expect("issue");
        let der = CertificateDer::from_pem_slice(c.cert_pem.as_bytes()).expect("pem");
        assert_eq!(role_of(&der), Some(Role::Reader));
        // verify the chain with rustls' own verifier
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(load_certs(&d.path().join(CA_CERT)).expect("ca")[0].clone())
            .expect("root");
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            provider,
        )
        .build()
        .expect("verifier");
        v.verify_client_cert(&der, &[], rustls_pki_types::UnixTime::now())
            .expect("a certificate from the loaded CA verifies");
    }
}
