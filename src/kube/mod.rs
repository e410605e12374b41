//! What a node with a `kubernetes` section writes so that stock kubelet, containerd's CRI and the
//! CNI plugins make it a Kubernetes node: kubelet's configuration and kubeconfigs, the cluster CA,
//! the static pods, the CNI network and containerd's configuration ([`files`]), and the services
//! as keel-init runs them ([`node_services`]: kubelet's flags, containerd's `--config`).
//!
//! Pure: this module reads nothing and writes nothing; stage 2 writes [`files`] (see
//! `crate::init::kubefiles`). Everything it writes lives where the read-only root leaves room:
//! kubelet's state under /var/lib/kubelet (on STATE, so its client certificate survives a
//! reboot), what is regenerated at every boot under /run/keel (a tmpfs).

use crate::config::{KubernetesConfig, NodeConfig};
use serde_json::{json, Value};
use std::path::PathBuf;

/// kubelet's directory (on STATE: /var is bound to /state/var).
pub const KUBELET_DIR: &str = "/var/lib/kubelet";
/// The KubeletConfiguration (JSON, which kubelet reads as the YAML it is).
pub const KUBELET_CONFIG: &str = "/var/lib/kubelet/config.json";
/// kubelet's kubeconfig: the configured one, or the one kubelet writes after TLS bootstrapping.
pub const KUBECONFIG: &str = "/var/lib/kubelet/kubeconfig";
/// The bootstrap-token kubeconfig kubelet bootstraps its client certificate with.
pub const BOOTSTRAP_KUBECONFIG: &str = "/var/lib/kubelet/bootstrap-kubeconfig";
/// The cluster CA (kubelet's `certDir` is /var/lib/kubelet/pki).
pub const CA_CERT: &str = "/var/lib/kubelet/pki/ca.crt";
/// Static pods, rewritten at every boot from the configuration.
pub const STATIC_POD_DIR: &str = "/run/keel/kubernetes/manifests";
/// The CNI network configuration containerd reads.
pub const CNI_CONF_DIR: &str = "/run/keel/cni/net.d";
pub const CNI_CONFLIST: &str = "/run/keel/cni/net.d/10-keel.conflist";
/// Debian's containernetworking-plugins.
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";
/// containerd's configuration for a Kubernetes node.
pub const CONTAINERD_CONFIG: &str = "/run/keel/containerd/config.toml";
pub const CONTAINERD_ENDPOINT: &str = "unix:///run/containerd/containerd.sock";
/// The name of the bridge the pods are attached to.
pub const BRIDGE: &str = "cni0";
/// kubelet's healthz, which the boot's health judge asks ([`healthz_ok`]).
pub const HEALTHZ_PORT: u16 = 10248;

/// One file to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFile {
    /// Absolute path on the node.
    pub path: PathBuf,
    pub contents: Vec<u8>,
    pub mode: u32,
}

fn json_file(path: &str, v: &Value, mode: u32) -> NodeFile {
    // serializing a Value cannot fail
    let mut contents = serde_json::to_vec_pretty(v).unwrap_or_default();
    contents.push(b'\n');
    NodeFile {
        path: path.into(),
        contents,
        mode,
    }
}

/// The KubeletConfiguration. keel-init starts every service in the root cgroup of its cgroup v2
/// hierarchy and runs no systemd, so the driver is cgroupfs (containerd 1.6 has no
/// RuntimeConfig RPC to say so itself), the pods' cgroups go under the root (`cgroupRoot: /`,
/// kubelet creates /kubepods), and kubeletCgroups/systemCgroups are left unset: there is no
/// cgroup of its own to move kubelet into.
pub fn kubelet_config(k: &KubernetesConfig) -> Value {
    let _ = k;
    json!({
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": "/",
        "containerRuntimeEndpoint": CONTAINERD_ENDPOINT,
        "authentication": {
            "x509": {"clientCAFile": CA_CERT},
            "webhook": {"enabled": true},
            "anonymous": {"enabled": false}
        },
        "authorization": {"mode": "Webhook"},
        "staticPodPath": STATIC_POD_DIR,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": HEALTHZ_PORT,
        "rotateCertificates": true,
        "serverTLSBootstrap": false,
        "failSwapOn": false,
        "resolvConf": crate::net::RESOLV_CONF,
        // the default, /usr/libexec/kubernetes/..., is on the read-only root
        "volumePluginDir": "/var/lib/kubelet/volumeplugins",
        // user-namespaced pods need kubelet's ID mappings from /etc/passwd and /etc/subuid; the
        // image has no user database (the audit refuses one), and kubelet v1.35 exits at start
        // when it cannot read them. ProcMountType depends on the same feature.
        "featureGates": {"UserNamespacesSupport": false, "ProcMountType": false},
    })
}

/// The bootstrap kubeconfig: the API server, the CA, and the bootstrap token as a bearer token.
pub fn bootstrap_kubeconfig(k: &KubernetesConfig, token: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": "keel",
            "cluster": {"server": k.api_server, "certificate-authority": CA_CERT}
        }],
        "users": [{"name": "kubelet-bootstrap", "user": {"token": token}}],
        "contexts": [{
            "name": "keel",
            "context": {"cluster": "keel", "user": "kubelet-bootstrap"}
        }],
        "current-context": "keel"
    })
}

/// The CNI network: a bridge with host-local addresses from the pod subnet. containerd's CRI
/// brings up each pod's loopback itself with the `loopback` plugin from [`CNI_BIN_DIR`], so it
/// is not in the list. No IP masquerade and no portmap (hostPort), though the image carries the
/// plugin: both need the iptables program, which the image does not carry, and portmap's DEL
/// fails without it ("neither iptables nor ip6tables usable"), which would leave every pod's
/// sandbox impossible to tear down.
pub fn cni_conflist(k: &KubernetesConfig) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": "keel",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": k.pod_subnet()}]],
                    "routes": [{"dst": "0.0.0.0/0"}]
                }
            }
        ]
    })
}

/// A TOML basic string: JSON's escapes are TOML's.
fn toml_string(s: &str) -> String {
    Value::from(s).to_string()
}

/// containerd's configuration (version 2): the CRI plugin with runc v2 without the systemd
/// cgroup driver, the sandbox image, the CNI directories and the registry mirrors.
pub fn containerd_config(k: &KubernetesConfig) -> String {
    let cri = "plugins.\"io.containerd.grpc.v1.cri\"";
    let mut mirrors = String::new();
    for (host, endpoints) in &k.registry_mirrors {
        let list: Vec<String> = endpoints.iter().map(|e| toml_string(e)).collect();
        mirrors.push_str(&format!(
            "\n[{cri}.registry.mirrors.{}]\nendpoint = [{}]\n",
            toml_string(host),
            list.join(", ")
        ));
    }
    format!(
        "# written by keel-init from the node configuration's kubernetes section\n\
         version = 2\n\
         \n\
         [{cri}]\n\
         sandbox_image = {sandbox}\n\
         \n\
         [{cri}.containerd]\n\
         default_runtime_name = \"runc\"\n\
         \n\
         [{cri}.containerd.runtimes.runc]\n\
         runtime_type = \"io.containerd.runc.v2\"\n\
         \n\
         [{cri}.containerd.runtimes.runc.options]\n\
         BinaryName = \"/usr/sbin/runc\"\n\
         SystemdCgroup = false\n\
         \n\
         [{cri}.cni]\n\
         bin_dir = {bin}\n\
         conf_dir = {conf}\n",
        sandbox = toml_string(k.sandbox_image()),
        bin = toml_string(CNI_BIN_DIR),
        conf = toml_string(CNI_CONF_DIR),
    ) + &mirrors
}

/// The file name of a static pod in [`STATIC_POD_DIR`] (names are validated DNS-1123
/// subdomains, so they are safe file names).
pub fn static_pod_file(name: &str) -> String {
    format!("{name}.json")
}

/// Every file a node with this section needs, in the order they are written. Secrets
/// (kubeconfigs) are 0600.
pub fn files(k: &KubernetesConfig) -> Vec<NodeFile> {
    let mut out = vec![NodeFile {
        path: CA_CERT.into(),
        contents: k.ca_cert.clone().into_bytes(),
        mode: 0o644,
    }];
    match (&k.bootstrap_token, &k.kubeconfig) {
        (Some(t), _) => out.push(json_file(
            BOOTSTRAP_KUBECONFIG,
            &bootstrap_kubeconfig(k, t),
            0o600,
        )),
        (None, Some(c)) => out.push(NodeFile {
            path: KUBECONFIG.into(),
            contents: c.clone().into_bytes(),
            mode: 0o600,
        }),
        (None, None) => {}
    }
    out.push(json_file(KUBELET_CONFIG, &kubelet_config(k), 0o644));
    out.push(json_file(CNI_CONFLIST, &cni_conflist(k), 0o644));
    out.push(NodeFile {
        path: CONTAINERD_CONFIG.into(),
        contents: containerd_config(k).into_bytes(),
        mode: 0o644,
    });
    for pod in &k.static_pods {
        if let Some(name) = KubernetesConfig::pod_name(pod) {
            let path = format!("{STATIC_POD_DIR}/{}", static_pod_file(name));
            out.push(json_file(&path, pod, 0o644));
        }
    }
    out
}

/// The flags keel-init gives kubelet; a configured argument setting one of them is dropped.
const KUBELET_FLAGS: &[&str] = &[
    "--config",
    "--kubeconfig",
    "--bootstrap-kubeconfig",
    "--hostname-override",
    "--node-labels",
    "--container-runtime-endpoint",
];

/// kubelet's arguments: ours, then the configured ones that do not set the same flags.
pub fn kubelet_args(k: &KubernetesConfig, configured: &[String]) -> Vec<String> {
    let mut args = vec![
        format!("--config={KUBELET_CONFIG}"),
        format!("--kubeconfig={KUBECONFIG}"),
    ];
    if k.bootstrap_token.is_some() {
        args.push(format!("--bootstrap-kubeconfig={BOOTSTRAP_KUBECONFIG}"));
    }
    if let Some(n) = &k.node_name {
        args.push(format!("--hostname-override={n}"));
    }
    if !k.node_labels.is_empty() {
        let labels: Vec<String> = k
            .node_labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        args.push(format!("--node-labels={}", labels.join(",")));
    }
    let mut skip_value = false;
    for a in configured {
        if std::mem::take(&mut skip_value) {
            continue;
        }
        if KUBELET_FLAGS.contains(&a.as_str()) {
            skip_value = true;
            continue;
        }
        let ours = KUBELET_FLAGS
            .iter()
            .any(|f| a.strip_prefix(f).is_some_and(|r| r.starts_with('=')));
        if !ours {
            args.push(a.clone());
        }
    }
    args
}

/// The services as keel-init runs them. Without a `kubernetes` section there is no kubelet
/// (an unjoined node): the `kubelet` service is dropped, with every mention of it in `after`
/// and `health.required`. With one, kubelet gets [`kubelet_args`] and joins
/// `health.required` (a boot is healthy only while it stays up), and containerd, unless its
/// arguments already name a configuration, `--config` [`CONTAINERD_CONFIG`].
pub fn node_services(cfg: &NodeConfig) -> NodeConfig {
    let mut cfg = cfg.clone();
    match &cfg.kubernetes {
        None => {
            cfg.services.retain(|s| s.name != "kubelet");
            for s in &mut cfg.services {
                s.after.retain(|a| a != "kubelet");
            }
            cfg.health.required.retain(|r| r != "kubelet");
        }
        Some(k) => {
            // a joined node's boot is healthy only while kubelet stays up (and answers)
            let has_kubelet = cfg.services.iter().any(|s| s.name == "kubelet");
            if has_kubelet && !cfg.health.required.iter().any(|r| r == "kubelet") {
                cfg.health.required.push("kubelet".into());
            }
            for s in &mut cfg.services {
                match s.name.as_str() {
                    "kubelet" => s.args = kubelet_args(k, &s.args),
                    "containerd" => {
                        let named = s
                            .args
                            .iter()
                            .any(|a| a == "--config" || a == "-c" || a.starts_with("--config="));
                        if !named {
                            s.args.push("--config".into());
                            s.args.push(CONTAINERD_CONFIG.into());
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    cfg
}

/// Whether an HTTP response from kubelet's health endpoint says healthy: status 200 and the
/// body `ok`.
pub fn healthz_ok(response: &[u8]) -> bool {
    let text = String::from_utf8_lossy(response);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    let status = head.lines().next().unwrap_or("");
    let mut words = status.split_whitespace();
    words.next().is_some_and(|v| v.starts_with("HTTP/"))
        && words.next() == Some("200")
        && body.trim() == "ok"
}

/// Whether an HTTP/1.0 answer to `GET /api/v1/nodes/NAME` says the node is Ready: `Ok(false)`
/// for a node not registered yet (404) or not Ready; an error for any other answer.
pub fn node_ready(response: &[u8]) -> Result<bool, String> {
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("the API server's answer has no HTTP header")?;
    let head = String::from_utf8_lossy(&response[..split]);
    let body = &response[split + 4..];
    let status = head.lines().next().unwrap_or("");
    match status.split_whitespace().nth(1) {
        Some("200") => {}
        Some("404") => return Ok(false),
        _ => {
            let text = String::from_utf8_lossy(&body[..body.len().min(200)]);
            return Err(format!("the API server answered {status:?}: {text}"));
        }
    }
    let node: Value = serde_json::from_slice(body).map_err(|e| format!("the Node object: {e}"))?;
    let conditions = node["status"]["conditions"].as_array();
    Ok(conditions.is_some_and(|c| {
        c.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ServiceConfig;
    use serde_json::json;

    fn ca_pem() -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.self_signed(&key).unwrap().pem()
    }

    fn section() -> KubernetesConfig {
        serde_json::from_value(json!({
            "api_server": "https://10.0.2.2:6443",
            "ca_cert": ca_pem(),
            "bootstrap_token": "abcdef.0123456789abcdef",
            "node_labels": {"tier": "edge", "node.kubernetes.io/pool": "a"},
            "pod_subnet": "10.244.1.0/24",
            "static_pods": [
                {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web"},
                 "spec": {"containers": [{"name": "c", "image": "registry.local/web:1"}]}}
            ]
        }))
        .unwrap()
    }

    fn parsed(f: &NodeFile) -> Value {
        serde_json::from_slice(&f.contents).unwrap()
    }

    fn find<'a>(files: &'a [NodeFile], path: &str) -> &'a NodeFile {
        files
            .iter()
            .find(|f| f.path == std::path::Path::new(path))
            .unwrap_or_else(|| panic!("no {path} in {files:#?}"))
    }

    #[test]
    fn kubelet_configuration_fits_containerd_1_6_and_keel_init() {
        let k = section();
        let files = files(&k);
        let c = parsed(find(&files, KUBELET_CONFIG));
        assert_eq!(c["apiVersion"], "kubelet.config.k8s.io/v1beta1");
        assert_eq!(c["kind"], "KubeletConfiguration");
        assert_eq!(c["cgroupDriver"], "cgroupfs");
        assert_eq!(c["cgroupRoot"], "/");
        assert_eq!(
            c["containerRuntimeEndpoint"],
            "unix:///run/containerd/containerd.sock"
        );
        assert_eq!(c["authentication"]["x509"]["clientCAFile"], CA_CERT);
        assert_eq!(c["authentication"]["webhook"]["enabled"], true);
        assert_eq!(c["authentication"]["anonymous"]["enabled"], false);
        assert_eq!(c["authorization"]["mode"], "Webhook");
        assert_eq!(c["staticPodPath"], STATIC_POD_DIR);
        // off the read-only root, and no user-namespace mappings (no /etc/passwd in the image):
        // without these the stock kubelet v1.35.4 exits at start on a KeelOS root
        assert_eq!(c["volumePluginDir"], "/var/lib/kubelet/volumeplugins");
        assert_eq!(c["featureGates"]["UserNamespacesSupport"], false);
        assert_eq!(c["featureGates"]["ProcMountType"], false);
        assert_eq!(c["healthzBindAddress"], "127.0.0.1");
        assert_eq!(c["healthzPort"], 10248);
        assert_eq!(c["rotateCertificates"], true);
        assert_eq!(c["serverTLSBootstrap"], false);
        assert_eq!(c["failSwapOn"], false);
        assert_eq!(c["resolvConf"], "/run/keel/resolv.conf");
        assert!(c.get("kubeletCgroups").is_none());
        // the CA is written as given, for kubelet's x509 authentication and the kubeconfig
        assert_eq!(find(&files, CA_CERT).contents, k.ca_cert.as_bytes());
    }

    #[test]
    fn a_bootstrap_token_gives_a_bootstrap_kubeconfig_and_flag() {
        let k = section();
        let files = files(&k);
        let f = find(&files, BOOTSTRAP_KUBECONFIG);
        assert_eq!(f.mode, 0o600);
        let b = parsed(f);
        assert_eq!(b["kind"], "Config");
        assert_eq!(b["current-context"], "keel");
        assert_eq!(b["contexts"][0]["context"]["cluster"], "keel");
        assert_eq!(b["contexts"][0]["context"]["user"], "kubelet-bootstrap");
        assert_eq!(
            b["clusters"][0]["cluster"]["server"],
            "https://10.0.2.2:6443"
        );
        assert_eq!(
            b["clusters"][0]["cluster"]["certificate-authority"],
            CA_CERT
        );
        assert_eq!(b["users"][0]["user"]["token"], "abcdef.0123456789abcdef");
        // kubelet writes its own kubeconfig after bootstrapping: none is generated
        assert!(!files
            .iter()
            .any(|f| f.path == std::path::Path::new(KUBECONFIG)));
        let args = kubelet_args(&k, &[]);
        assert_eq!(
            args,
            [
                "--config=/var/lib/kubelet/config.json",
                "--kubeconfig=/var/lib/kubelet/kubeconfig",
                "--bootstrap-kubeconfig=/var/lib/kubelet/bootstrap-kubeconfig",
                "--node-labels=node.kubernetes.io/pool=a,tier=edge",
            ]
        );
    }

    #[test]
    fn a_given_kubeconfig_is_written_as_is_without_bootstrap() {
        let k = KubernetesConfig {
            bootstrap_token: None,
            kubeconfig: Some("apiVersion: v1\nkind: Config\n".into()),
            node_name: Some("worker-7".into()),
            node_labels: Default::default(),
            ..section()
        };
        let files = files(&k);
        let f = find(&files, KUBECONFIG);
        assert_eq!(f.contents, b"apiVersion: v1\nkind: Config\n");
        assert_eq!(f.mode, 0o600);
        assert!(!files
            .iter()
            .any(|f| f.path == std::path::Path::new(BOOTSTRAP_KUBECONFIG)));
        assert_eq!(
            kubelet_args(&k, &[]),
            [
                "--config=/var/lib/kubelet/config.json",
                "--kubeconfig=/var/lib/kubelet/kubeconfig",
                "--hostname-override=worker-7",
            ]
        );
    }

    #[test]
    fn configured_kubelet_arguments_cannot_override_ours() {
        let k = section();
        let configured: Vec<String> = [
            "--config=/var/lib/kubelet/config.yaml",
            "--kubeconfig",
            "/etc/kubernetes/kubelet.conf",
            "--container-runtime-endpoint=unix:///x.sock",
            "--v=2",
            "--configx=1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let args = kubelet_args(&k, &configured);
        assert_eq!(&args[args.len() - 2..], ["--v=2", "--configx=1"]);
        assert_eq!(args.len(), 6, "{args:?}");
        assert!(!args
            .iter()
            .any(|a| a.contains("kubelet.conf") || a.contains("x.sock")));
    }

    #[test]
    fn cni_network_is_a_bridge_with_host_local_addresses() {
        let k = section();
        let files = files(&k);
        let c = parsed(find(&files, CNI_CONFLIST));
        assert_eq!(c["cniVersion"], "1.0.0");
        let plugins = c["plugins"].as_array().unwrap();
        let types: Vec<_> = plugins
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect();
        // no portmap: its DEL needs iptables, which the image lacks
        assert_eq!(types, ["bridge"]);
        assert_eq!(plugins[0]["bridge"], "cni0");
        assert_eq!(plugins[0]["isGateway"], true);
        assert_eq!(plugins[0]["ipam"]["type"], "host-local");
        assert_eq!(
            plugins[0]["ipam"]["ranges"][0][0]["subnet"],
            "10.244.1.0/24"
        );
        assert_eq!(plugins[0]["ipMasq"], false);
        // the default subnet
        let d = cni_conflist(&KubernetesConfig {
            pod_subnet: None,
            ..k
        });
        assert_eq!(
            d["plugins"][0]["ipam"]["ranges"][0][0]["subnet"],
            "10.88.0.0/16"
        );
    }

    #[test]
    fn containerd_config_parses_as_toml_with_the_cri_settings() {
        let k = KubernetesConfig {
            sandbox_image: Some("registry.local:5000/pause:3.10".into()),
            registry_mirrors: [(
                "registry.local:5000".to_string(),
                vec![
                    "http://10.0.2.100:5000".to_string(),
                    "https://registry.local:5000".to_string(),
                ],
            )]
            .into(),
            ..section()
        };
        let files = files(&k);
        let f = find(&files, CONTAINERD_CONFIG);
        let text = std::str::from_utf8(&f.contents).unwrap();
        let doc: toml_edit::DocumentMut = text.parse().unwrap();
        assert_eq!(doc["version"].as_integer(), Some(2));
        let cri = &doc["plugins"]["io.containerd.grpc.v1.cri"];
        assert_eq!(
            cri["sandbox_image"].as_str(),
            Some("registry.local:5000/pause:3.10")
        );
        assert_eq!(
            cri["containerd"]["default_runtime_name"].as_str(),
            Some("runc")
        );
        let runc = &cri["containerd"]["runtimes"]["runc"];
        assert_eq!(runc["runtime_type"].as_str(), Some("io.containerd.runc.v2"));
        assert_eq!(runc["options"]["SystemdCgroup"].as_bool(), Some(false));
        assert_eq!(
            runc["options"]["BinaryName"].as_str(),
            Some("/usr/sbin/runc")
        );
        assert_eq!(cri["cni"]["bin_dir"].as_str(), Some(CNI_BIN_DIR));
        assert_eq!(cri["cni"]["conf_dir"].as_str(), Some(CNI_CONF_DIR));
        let endpoints = cri["registry"]["mirrors"]["registry.local:5000"]["endpoint"]
            .as_array()
            .unwrap();
        let endpoints: Vec<_> = endpoints.iter().map(|e| e.as_str().unwrap()).collect();
        assert_eq!(
            endpoints,
            ["http://10.0.2.100:5000", "https://registry.local:5000"]
        );
        // the conflist goes where containerd reads
        assert!(std::path::Path::new(CNI_CONFLIST).starts_with(CNI_CONF_DIR));
        // the default sandbox image, and a string that needs escaping stays one string
        let d = containerd_config(&section());
        assert!(d.contains("sandbox_image = \"registry.k8s.io/pause:3.10.1\""));
        let odd: toml_edit::DocumentMut =
            format!("x = {}", toml_string("a\"b\\c")).parse().unwrap();
        assert_eq!(odd["x"].as_str(), Some("a\"b\\c"));
    }

    #[test]
    fn static_pods_go_to_the_static_pod_path() {
        let k = section();
        let files = files(&k);
        let f = find(&files, "/run/keel/kubernetes/manifests/web.json");
        assert_eq!(parsed(f), k.static_pods[0]);
        // every file is absolute and in a writable place
        for f in &files {
            assert!(
                f.path.starts_with("/var/lib/kubelet") || f.path.starts_with("/run/keel"),
                "{}",
                f.path.display()
            );
        }
    }

    #[test]
    fn without_a_kubernetes_section_kubelet_is_not_run() {
        let mut cfg = NodeConfig::default();
        let mut extra = ServiceConfig::new("extra", "/usr/bin/extra", &[]);
        extra.after = vec!["kubelet".into(), "containerd".into()];
        cfg.services.push(extra);
        cfg.health.required.push("kubelet".into());
        let s = node_services(&cfg);
        let names: Vec<_> = s.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["keel-agent", "containerd", "extra"]);
        assert_eq!(s.service("extra").unwrap().after, ["containerd"]);
        assert!(!s.health.required.contains(&"kubelet".to_string()));
        assert!(s.validate().is_empty(), "{:?}", s.validate());
        // containerd keeps its own configuration
        assert!(s.service("containerd").unwrap().args.is_empty());
    }

    #[test]
    fn with_a_kubernetes_section_kubelet_and_containerd_get_their_files() {
        let cfg = NodeConfig {
            kubernetes: Some(section()),
            ..NodeConfig::default()
        };
        let s = node_services(&cfg);
        let kubelet = s.service("kubelet").unwrap();
        assert_eq!(kubelet.args, kubelet_args(&section(), &[]));
        assert_eq!(kubelet.after, ["containerd"]);
        assert_eq!(s.health.required, ["keel-agent", "containerd", "kubelet"]);
        // once only, when the configuration already names it
        assert_eq!(node_services(&s).health.required, s.health.required);
        assert_eq!(
            s.service("containerd").unwrap().args,
            ["--config", CONTAINERD_CONFIG]
        );
        // a containerd with a configuration of its own keeps it
        let mut own = cfg.clone();
        own.services[1].args = vec!["-c".into(), "/etc/containerd/mine.toml".into()];
        let s = node_services(&own);
        assert_eq!(
            s.service("containerd").unwrap().args,
            ["-c", "/etc/containerd/mine.toml"]
        );
    }

    #[test]
    fn kubelet_health_answers() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n\
                   X-Content-Type-Options: nosniff\r\nDate: x\r\nContent-Length: 2\r\n\r\nok";
        assert!(healthz_ok(ok));
        let failing = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 40\r\n\r\n\
                        [-]syncloop failed: reason withheld\nhealthz check failed";
        assert!(!healthz_ok(failing));
        assert!(!healthz_ok(b"HTTP/1.1 200 OK\r\n\r\nnot ok"));
        assert!(!healthz_ok(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"));
        assert!(!healthz_ok(b""));
        assert!(!healthz_ok(b"\x16\x03\x01garbage\r\n\r\nok"));
    }

    #[test]
    fn node_ready_reads_the_ready_condition() {
        let answer = |status: &str, body: &str| {
            format!("HTTP/1.0 {status}\r\nContent-Type: application/json\r\n\r\n{body}")
        };
        let node = |ready: &str| {
            json!({"kind": "Node", "status": {"conditions": [
                {"type": "MemoryPressure", "status": "False"},
                {"type": "Ready", "status": ready, "reason": "KubeletReady"}
            ]}})
            .to_string()
        };
        assert_eq!(
            node_ready(answer("200 OK", &node("True")).as_bytes()),
            Ok(true)
        );
        assert_eq!(
            node_ready(answer("200 OK", &node("False")).as_bytes()),
            Ok(false)
        );
        assert_eq!(
            node_ready(answer("200 OK", &node("Unknown")).as_bytes()),
            Ok(false)
        );
        assert_eq!(node_ready(answer("200 OK", "{}").as_bytes()), Ok(false));
        // not registered yet
        assert_eq!(
            node_ready(answer("404 Not Found", "{}").as_bytes()),
            Ok(false)
        );
        let e = node_ready(answer("403 Forbidden", "nodes \"x\" is forbidden").as_bytes());
        assert!(e.unwrap_err().contains("403 Forbidden"));
        assert!(node_ready(answer("200 OK", "{not json").as_bytes()).is_err());
        assert!(node_ready(b"garbage").is_err());
    }
}
