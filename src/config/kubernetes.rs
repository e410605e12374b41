//! The `kubernetes` section of the node configuration: how the node joins a cluster, and its
//! static pods. This module owns the section's schema and its validation (pure: it reads
//! nothing and writes nothing); what the node writes from it is [`crate::kube`]'s.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The pod network of the default CNI configuration when none is configured (containerd's own
/// default bridge network uses the same).
pub const DEFAULT_POD_SUBNET: &str = "10.88.0.0/16";
/// The sandbox (pause) image containerd runs each pod's namespaces in, when none is configured:
/// the one Kubernetes v1.35 names.
pub const DEFAULT_SANDBOX_IMAGE: &str = "registry.k8s.io/pause:3.10.1";

/// How the node joins a Kubernetes cluster. Without this section kubelet is not started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesConfig {
    /// The API server, e.g. `https://10.0.2.2:6443`.
    pub api_server: String,
    /// The cluster CA certificate (PEM): the API server's certificate is checked against it,
    /// and kubelet's server trusts client certificates it signed.
    pub ca_cert: String,
    /// A bootstrap token (`abcdef.0123456789abcdef`): kubelet TLS bootstrapping, as
    /// `kubeadm join` does. Exactly one of this and `kubeconfig`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap_token: Option<String>,
    /// A ready kubeconfig for kubelet (its client credentials). Exactly one of this and
    /// `bootstrap_token`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubeconfig: Option<String>,
    /// The node's name in the cluster; default: the host name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// Labels kubelet registers the node with.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_labels: BTreeMap<String, String>,
    /// A boot is healthy only once the API server has had the node Ready for the health
    /// window (asked with kubelet's bootstrapped client certificate: needs `bootstrap_token`).
    #[serde(default)]
    pub require_ready: bool,
    /// Pod manifests (JSON objects: kind Pod, apiVersion v1, metadata.name) kubelet runs as
    /// static pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub static_pods: Vec<serde_json::Value>,
    /// The pod network of the node's bridge (host-local IPAM); default [`DEFAULT_POD_SUBNET`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_subnet: Option<String>,
    /// The sandbox image; default [`DEFAULT_SANDBOX_IMAGE`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox_image: Option<String>,
    /// Registries containerd reaches at other endpoints than `https://HOST`: the registry's
    /// host (`host[:port]`, as image references name it) to the endpoint URLs to try in turn,
    /// e.g. `{"10.0.2.100:5000": ["http://10.0.2.100:5000"]}` for a registry served over plain
    /// HTTP on the node's network.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub registry_mirrors: BTreeMap<String, Vec<String>>,
}

impl KubernetesConfig {
    /// The pod subnet in use.
    pub fn pod_subnet(&self) -> &str {
        self.pod_subnet.as_deref().unwrap_or(DEFAULT_POD_SUBNET)
    }

    /// The sandbox image in use.
    pub fn sandbox_image(&self) -> &str {
        self.sandbox_image
            .as_deref()
            .unwrap_or(DEFAULT_SANDBOX_IMAGE)
    }

    /// The name of a static pod (its `metadata.name`), when it has one.
    pub fn pod_name(pod: &serde_json::Value) -> Option<&str> {
        pod.get("metadata")?.get("name")?.as_str()
    }

    /// Every problem with the section, each naming its field (`kubernetes.<field>`).
    pub fn validate(&self) -> Vec<String> {
        let mut errs = Vec::new();
        if let Err(why) = https_url(&self.api_server) {
            errs.push(format!(
                "kubernetes.api_server: {:?} {why}",
                self.api_server
            ));
        }
        if let Err(why) = pem_certificate(&self.ca_cert) {
            errs.push(format!("kubernetes.ca_cert: {why}"));
        }
        match (&self.bootstrap_token, &self.kubeconfig) {
            (None, None) => errs.push(
                "kubernetes: give either bootstrap_token or kubeconfig (kubelet needs \
                 credentials to join)"
                    .to_string(),
            ),
            (Some(_), Some(_)) => {
                errs.push("kubernetes: give bootstrap_token or kubeconfig, not both".to_string())
            }
            _ => {}
        }
        if self.require_ready && self.kubeconfig.is_some() {
            errs.push(
                "kubernetes.require_ready: needs bootstrap_token (the Ready check asks the API \
                 server with the client certificate kubelet gets by TLS bootstrapping)"
                    .to_string(),
            );
        }
        if let Some(t) = &self.bootstrap_token {
            if !bootstrap_token(t) {
                // the token is a secret: not echoed
                errs.push(
                    "kubernetes.bootstrap_token: is not a bootstrap token; it looks like \
                     abcdef.0123456789abcdef (6 and 16 lowercase letters or digits)"
                        .to_string(),
                );
            }
        }
        if let Some(k) = &self.kubeconfig {
            if k.trim().is_empty() || k.contains('\0') {
                errs.push(
                    "kubernetes.kubeconfig: must be the text of a kubeconfig (not empty, no NUL)"
                        .to_string(),
                );
            }
        }
        if let Some(n) = &self.node_name {
            if !dns1123_subdomain(n) {
                errs.push(format!(
                    "kubernetes.node_name: {n:?} is not a DNS-1123 subdomain (lowercase letters, \
                     digits, '-' and '.', at most 253 characters)"
                ));
            }
        }
        for (k, v) in &self.node_labels {
            if let Err(why) = label_key(k) {
                errs.push(format!("kubernetes.node_labels: key {k:?} {why}"));
            }
            if !label_value(v) {
                errs.push(format!(
                    "kubernetes.node_labels: value {v:?} of {k:?} must be at most 63 letters, \
                     digits, '-', '_' or '.', starting and ending with a letter or digit"
                ));
            }
        }
        if let Some(s) = &self.pod_subnet {
            if let Err(e) = s.parse::<super::Ipv4Cidr>() {
                errs.push(format!("kubernetes.pod_subnet: {e}"));
            } else if s.parse::<super::Ipv4Cidr>().is_ok_and(|c| c.prefix > 28) {
                errs.push(format!(
                    "kubernetes.pod_subnet: {s:?} is too small for pods (prefix at most /28)"
                ));
            }
        }
        if let Some(i) = &self.sandbox_image {
            if i.is_empty() || i.contains(char::is_whitespace) || i.contains('"') {
                errs.push(format!(
                    "kubernetes.sandbox_image: {i:?} is not an image reference like \
                     registry.k8s.io/pause:3.10.1"
                ));
            }
        }
        for (host, endpoints) in &self.registry_mirrors {
            if !registry_host(host) {
                errs.push(format!(
                    "kubernetes.registry_mirrors: key {host:?} is not a registry host like \
                     registry.example.com or 10.0.2.100:5000 (no scheme, no path)"
                ));
            }
            if endpoints.is_empty() {
                errs.push(format!(
                    "kubernetes.registry_mirrors[{host:?}]: give at least one endpoint URL"
                ));
            }
            for e in endpoints {
                if let Err(why) = endpoint_url(e) {
                    errs.push(format!(
                        "kubernetes.registry_mirrors[{host:?}]: endpoint {e:?} {why}"
                    ));
                }
            }
        }
        let mut names = BTreeMap::new();
        for (i, pod) in self.static_pods.iter().enumerate() {
            let at = format!("kubernetes.static_pods[{i}]");
            if !pod.is_object() {
                errs.push(format!("{at}: must be a JSON object (a Pod manifest)"));
                continue;
            }
            if pod.get("kind").and_then(|k| k.as_str()) != Some("Pod") {
                errs.push(format!("{at}: kind must be \"Pod\""));
            }
            if pod.get("apiVersion").and_then(|k| k.as_str()) != Some("v1") {
                errs.push(format!("{at}: apiVersion must be \"v1\""));
            }
            match Self::pod_name(pod) {
                None => errs.push(format!("{at}: metadata.name is missing")),
                Some(n) if !dns1123_subdomain(n) => errs.push(format!(
                    "{at}: metadata.name {n:?} is not a DNS-1123 subdomain"
                )),
                Some(n) => {
                    if let Some(j) = names.insert(n, i) {
                        errs.push(format!(
                            "{at}: metadata.name {n:?} is also static_pods[{j}]'s; names must be \
                             unique"
                        ));
                    }
                }
            }
        }
        errs
    }
}

/// Whether `s` is an `https://host[:port][/]` URL; says why not otherwise.
fn https_url(s: &str) -> Result<(), &'static str> {
    let uri: http::Uri = s
        .parse()
        .map_err(|_| "is not a URL like https://10.0.2.2:6443")?;
    if uri.scheme_str() != Some("https") {
        return Err("must be an https:// URL (kubelet talks TLS to the API server)");
    }
    match uri.authority() {
        Some(a) if !a.host().is_empty() => {}
        _ => return Err("has no host"),
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err("must not have a path or query");
    }
    Ok(())
}

/// Whether `s` is a registry host as image references name it: `host[:port]`.
fn registry_host(s: &str) -> bool {
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (s, None),
    };
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host
            .split('.')
            .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    host_ok && port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p > 0))
}

/// Whether `s` is an `http://` or `https://` URL with a host; says why not otherwise.
fn endpoint_url(s: &str) -> Result<(), &'static str> {
    let uri: http::Uri = s
        .parse()
        .map_err(|_| "is not a URL like http://10.0.2.100:5000")?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err("must be an http:// or https:// URL");
    }
    match uri.authority() {
        Some(a) if !a.host().is_empty() => Ok(()),
        _ => Err("has no host"),
    }
}

/// Whether `pem` holds at least one X.509 certificate and nothing unparsable.
fn pem_certificate(pem: &str) -> Result<(), String> {
    let mut n = 0;
    for p in x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()) {
        let p = p.map_err(|e| format!("is not PEM text: {e}"))?;
        if p.label != "CERTIFICATE" {
            return Err(format!(
                "holds a {:?} block; only CERTIFICATE blocks belong here",
                p.label
            ));
        }
        p.parse_x509()
            .map_err(|e| format!("certificate {} does not parse: {e}", n + 1))?;
        n += 1;
    }
    if n == 0 {
        return Err("holds no PEM certificate (-----BEGIN CERTIFICATE-----)".to_string());
    }
    Ok(())
}

/// `[a-z0-9]{6}.[a-z0-9]{16}`.
fn bootstrap_token(t: &str) -> bool {
    let ok = |s: &str, n| {
        s.len() == n
            && s.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
    };
    t.split_once('.')
        .is_some_and(|(id, secret)| ok(id, 6) && ok(secret, 16))
}

/// A DNS-1123 subdomain, as Kubernetes names objects.
pub fn dns1123_subdomain(s: &str) -> bool {
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            let b = l.as_bytes();
            !b.is_empty()
                && alnum(b[0])
                && alnum(b[b.len() - 1])
                && b.iter().all(|&c| alnum(c) || c == b'-')
        })
}

/// The name part of a label key, or a label value (non-empty): at most 63 characters,
/// alphanumeric at both ends, `-`, `_`, `.` inside.
fn label_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

fn label_value(s: &str) -> bool {
    s.is_empty() || label_name(s)
}

/// A label key kubelet may register the node with: `[prefix/]name` as Kubernetes validates
/// it, and, kept simpler than kubelet's own list, no prefix in the kubernetes.io or k8s.io
/// namespaces except `kubelet.kubernetes.io/` and `node.kubernetes.io/` (kubelet refuses the
/// others, node-role.kubernetes.io among them: the NodeRestriction admission forbids a node to
/// label itself a role).
fn label_key(k: &str) -> Result<(), &'static str> {
    let (prefix, name) = match k.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    if !label_name(name) {
        return Err(
            "needs a name of at most 63 letters, digits, '-', '_' or '.', starting and \
                    ending with a letter or digit",
        );
    }
    let Some(p) = prefix else { return Ok(()) };
    if !dns1123_subdomain(p) {
        return Err("has a prefix that is not a DNS-1123 subdomain");
    }
    let reserved = ["kubernetes.io", "k8s.io"]
        .iter()
        .any(|ns| p == *ns || p.ends_with(&format!(".{ns}")));
    if reserved && !matches!(p, "kubelet.kubernetes.io" | "node.kubernetes.io") {
        return Err(
            "is in the kubernetes.io/k8s.io namespaces, which kubelet may not set \
                    (only kubelet.kubernetes.io/ and node.kubernetes.io/ prefixes are allowed)",
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    pub(crate) fn ca_pem() -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.self_signed(&key).unwrap().pem()
    }

    fn good() -> KubernetesConfig {
        serde_json::from_value(json!({
            "api_server": "https://10.0.2.2:6443",
            "ca_cert": ca_pem(),
            "bootstrap_token": "abcdef.0123456789abcdef",
            "node_name": "node-1.example",
            "node_labels": {"tier": "edge", "node.kubernetes.io/pool": "a", "example.com/x": ""},
            "require_ready": true,
            "static_pods": [
                {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web"},
                 "spec": {"containers": [{"name": "c", "image": "registry.local/web:1"}]}}
            ]
        }))
        .unwrap()
    }

    #[test]
    fn a_good_section_has_no_errors_and_defaults() {
        let k = good();
        assert_eq!(k.validate(), Vec::<String>::new());
        assert_eq!(k.pod_subnet(), DEFAULT_POD_SUBNET);
        assert_eq!(k.sandbox_image(), DEFAULT_SANDBOX_IMAGE);
        let with_kubeconfig = KubernetesConfig {
            bootstrap_token: None,
            kubeconfig: Some("apiVersion: v1\nkind: Config\n".into()),
            pod_subnet: Some("10.244.1.0/24".into()),
            require_ready: false,
            ..k
        };
        assert!(with_kubeconfig.validate().is_empty());
        let ready = KubernetesConfig {
            require_ready: true,
            ..with_kubeconfig
        };
        assert_eq!(ready.validate().len(), 1);
        assert!(ready.validate()[0].starts_with("kubernetes.require_ready: needs bootstrap_token"));
        for url in [
            "https://api.example:6443",
            "https://[::1]:6443/",
            "https://k8s",
        ] {
            assert_eq!(https_url(url), Ok(()), "{url}");
        }
    }

    #[test]
    fn a_bad_section_gets_every_error_naming_its_field() {
        let k: KubernetesConfig = serde_json::from_value(json!({
            "api_server": "http://10.0.2.2:6443",
            "ca_cert": "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            "bootstrap_token": "ABCDEF.s3cr3ts3cr3ts3cr",
            "kubeconfig": "",
            "node_name": "Node_1",
            "node_labels": {
                "node-role.kubernetes.io/worker": "",
                "bad key!": "x",
                "ok": "-bad-value-",
                "k8s.io/x": "y"
            },
            "pod_subnet": "10.88.0.0",
            "sandbox_image": "pause with space",
            "registry_mirrors": {
                "http://reg:5000": ["http://reg:5000"],
                "reg:99999": [],
                "10.0.2.100:5000": ["ftp://10.0.2.100", "http://10.0.2.100:5000"]
            },
            "static_pods": [
                {"apiVersion": "v1", "kind": "Deployment", "metadata": {"name": "a"}},
                {"apiVersion": "apps/v1", "kind": "Pod", "metadata": {}},
                {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a"}},
                {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "Bad_Name"}},
                "not an object"
            ]
        }))
        .unwrap();
        let errs = k.validate();
        let want = [
            "kubernetes.api_server: \"http://10.0.2.2:6443\" must be an https:// URL",
            "kubernetes.ca_cert: holds a \"PRIVATE KEY\" block",
            "kubernetes: give bootstrap_token or kubeconfig, not both",
            "kubernetes.bootstrap_token: is not a bootstrap token",
            "kubernetes.kubeconfig: must be the text of a kubeconfig",
            "kubernetes.node_name: \"Node_1\" is not a DNS-1123 subdomain",
            "kubernetes.node_labels: key \"bad key!\" needs a name",
            "kubernetes.node_labels: key \"k8s.io/x\" is in the kubernetes.io/k8s.io namespaces",
            "kubernetes.node_labels: key \"node-role.kubernetes.io/worker\" is in the",
            "kubernetes.node_labels: value \"-bad-value-\" of \"ok\"",
            "kubernetes.pod_subnet: \"10.88.0.0\" has no prefix length",
            "kubernetes.sandbox_image: \"pause with space\"",
            "kubernetes.registry_mirrors[\"10.0.2.100:5000\"]: endpoint \"ftp://10.0.2.100\" must be an http:// or https:// URL",
            "kubernetes.registry_mirrors: key \"http://reg:5000\" is not a registry host",
            "kubernetes.registry_mirrors: key \"reg:99999\" is not a registry host",
            "kubernetes.registry_mirrors[\"reg:99999\"]: give at least one endpoint URL",
            "kubernetes.static_pods[0]: kind must be \"Pod\"",
            "kubernetes.static_pods[1]: apiVersion must be \"v1\"",
            "kubernetes.static_pods[1]: metadata.name is missing",
            "kubernetes.static_pods[2]: metadata.name \"a\" is also static_pods[0]'s",
            "kubernetes.static_pods[3]: metadata.name \"Bad_Name\" is not a DNS-1123",
            "kubernetes.static_pods[4]: must be a JSON object",
        ];
        for w in want {
            assert!(
                errs.iter().any(|e| e.starts_with(w)),
                "missing error {w:?} in {errs:#?}"
            );
        }
        assert_eq!(errs.len(), want.len(), "{errs:#?}");
        // the token is a secret and never appears in a message
        assert!(!errs.iter().any(|e| e.contains("s3cr3t")));
    }

    #[test]
    fn credentials_url_and_ca_are_checked() {
        let none = KubernetesConfig {
            bootstrap_token: None,
            ..good()
        };
        assert_eq!(
            none.validate(),
            [
                "kubernetes: give either bootstrap_token or kubeconfig (kubelet needs credentials \
              to join)"
            ]
        );
        for bad in [
            "abcdef0123456789abcdef",
            "abcde.0123456789abcdef",
            "abcdef.0123456789abcde",
        ] {
            assert!(!bootstrap_token(bad), "{bad}");
        }
        assert!(bootstrap_token("07401b.f395accd246ae52d"));
        for (url, why) in [
            ("https://", "is not a URL"),
            ("10.0.2.2:6443", "must be an https:// URL"),
            ("https://10.0.2.2:6443/api", "must not have a path"),
        ] {
            let e = https_url(url).unwrap_err();
            assert!(e.starts_with(why), "{url}: {e}");
        }
        assert!(pem_certificate("")
            .unwrap_err()
            .contains("no PEM certificate"));
        let garbled = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(pem_certificate(garbled)
            .unwrap_err()
            .contains("does not parse"));
        // a bundle of two CAs is fine
        assert_eq!(pem_certificate(&(ca_pem() + &ca_pem())), Ok(()));
    }

    #[test]
    fn label_keys_follow_kubernetes() {
        for ok in [
            "a",
            "example.com/role",
            "kubelet.kubernetes.io/x",
            "node.kubernetes.io/y",
            "a.b-c_d",
        ] {
            assert_eq!(label_key(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "/x",
            "a/",
            "Example.com/x",
            "topology.kubernetes.io/zone",
            "kubernetes.io/hostname",
            &"x".repeat(64),
        ] {
            assert!(label_key(bad).is_err(), "{bad}");
        }
        assert!(label_value(""));
        assert!(!label_value(&"v".repeat(64)));
    }
}
