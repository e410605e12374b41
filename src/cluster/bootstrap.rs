//! What `kubeadm init` leaves behind for `kubeadm join` and kubelet TLS bootstrapping: a
//! bootstrap token and the RBAC bindings that let its holders ask for (and get auto-approved)
//! node client certificates. Also the kubeconfig files of the admin and the controller-manager.

use super::ClusterError;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{
    ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
};
use kube::api::{Api, ObjectMeta, PostParams};
use kube::Client;
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// The group kubeadm puts its default node bootstrap tokens in.
pub const BOOTSTRAP_GROUP: &str = "system:bootstrappers:kubeadm:default-node-token";

/// A bootstrap token `<id>.<secret>`: 6 and 16 characters of `[a-z0-9]`.
#[derive(Clone, PartialEq, Eq)]
pub struct BootstrapToken {
    id: String,
    secret: String,
}

impl fmt::Debug for BootstrapToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BootstrapToken({}.<secret>)", self.id)
    }
}

impl fmt::Display for BootstrapToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.id, self.secret)
    }
}

fn token_chars(s: &str, n: usize) -> bool {
    s.len() == n
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

impl BootstrapToken {
    /// A token from 22 random bytes (the caller's randomness: this does no I/O).
    pub fn from_random(bytes: [u8; 22]) -> BootstrapToken {
        const ALPHABET: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";
        let s: String = bytes
            .iter()
            .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char)
            .collect();
        BootstrapToken {
            id: s[..6].to_string(),
            secret: s[6..].to_string(),
        }
    }

    /// Parse `<id>.<secret>` as kubeadm writes it.
    pub fn parse(text: &str) -> Result<BootstrapToken, ClusterError> {
        let text = text.trim();
        match text.split_once('.') {
            Some((id, secret)) if token_chars(id, 6) && token_chars(secret, 16) => {
                Ok(BootstrapToken {
                    id: id.to_string(),
                    secret: secret.to_string(),
                })
            }
            _ => Err(ClusterError::BadToken(text.chars().take(40).collect())),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The Secret the API server's bootstrap authenticator looks the token up in.
    pub fn secret_object(&self) -> Secret {
        let data: BTreeMap<String, String> = [
            ("token-id", self.id.as_str()),
            ("token-secret", self.secret.as_str()),
            ("description", "KeelOS test control plane (keel-cluster)"),
            ("usage-bootstrap-authentication", "true"),
            ("usage-bootstrap-signing", "true"),
            ("auth-extra-groups", BOOTSTRAP_GROUP),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        Secret {
            metadata: ObjectMeta {
                name: Some(format!("bootstrap-token-{}", self.id)),
                namespace: Some("kube-system".into()),
                ..ObjectMeta::default()
            },
            type_: Some("bootstrap.kubernetes.io/token".into()),
            string_data: Some(data),
            ..Secret::default()
        }
    }
}

/// The ClusterRoleBindings kubeadm creates for TLS bootstrapping: (binding, role, group).
pub const BINDINGS: &[(&str, &str, &str)] = &[
    (
        "kubeadm:kubelet-bootstrap",
        "system:node-bootstrapper",
        BOOTSTRAP_GROUP,
    ),
    (
        "kubeadm:node-autoapprove-bootstrap",
        "system:certificates.k8s.io:certificatesigningrequests:nodeclient",
        BOOTSTRAP_GROUP,
    ),
    (
        "kubeadm:node-autoapprove-certificate-rotation",
        "system:certificates.k8s.io:certificatesigningrequests:selfnodeclient",
        "system:nodes",
    ),
];

pub fn binding_object(name: &str, role: &str, group: &str) -> ClusterRoleBinding {
    ClusterRoleBinding {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: role.into(),
        },
        subjects: Some(vec![Subject {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "Group".into(),
            name: group.into(),
            namespace: None,
        }]),
    }
}

/// How a kubeconfig authenticates.
#[derive(Debug, Clone, Copy)]
pub enum Credentials<'a> {
    /// PEM client certificate and key.
    Cert { cert_pem: &'a str, key_pem: &'a str },
    /// A bearer token (e.g. a bootstrap token).
    Token(&'a str),
}

/// A kubeconfig with everything inline, so it can be copied anywhere.
pub fn kubeconfig(server: &str, ca_pem: &str, user: &str, creds: Credentials<'_>) -> String {
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s.as_bytes());
    let auth = match creds {
        Credentials::Cert { cert_pem, key_pem } => format!(
            "    client-certificate-data: {}\n    client-key-data: {}\n",
            b64(cert_pem),
            b64(key_pem)
        ),
        Credentials::Token(t) => format!("    token: {t}\n"),
    };
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: keelos\n  cluster:\n    server: {server}\n    \
         certificate-authority-data: {ca}\nusers:\n- name: {user}\n  user:\n{auth}contexts:\n\
         - name: {user}@keelos\n  context:\n    cluster: keelos\n    user: {user}\n\
         current-context: {user}@keelos\n",
        ca = b64(ca_pem),
    )
}

/// A kube-rs client from kubeconfig text.
pub async fn client_from_kubeconfig(text: &str) -> Result<Client, ClusterError> {
    let kc = kube::config::Kubeconfig::from_yaml(text)
        .map_err(|e| ClusterError::Client(format!("parsing kubeconfig: {e}")))?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
        .await
        .map_err(|e| ClusterError::Client(format!("loading kubeconfig: {e}")))?;
    Client::try_from(cfg).map_err(|e| ClusterError::Client(format!("building client: {e}")))
}

/// Create `obj` unless it exists (a restarted cluster keeps its objects).
async fn ensure<K>(api: &Api<K>, obj: &K) -> Result<(), kube::Error>
where
    K: kube::Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + fmt::Debug,
{
    match api.create(&PostParams::default(), obj).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

/// kube-public/cluster-info, which `kubeadm join` discovery reads anonymously: a kubeconfig
/// with the server and the CA. The bootstrapsigner controller adds `jws-kubeconfig-<token id>`.
pub fn cluster_info_object(server: &str, ca_pem: &str) -> ConfigMap {
    let mut kc = kubeconfig(server, ca_pem, "", Credentials::Token(""));
    // Discovery's kubeconfig names the cluster only.
    if let Some(i) = kc.find("users:") {
        kc.truncate(i);
    }
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(CLUSTER_INFO.into()),
            namespace: Some("kube-public".into()),
            ..ObjectMeta::default()
        },
        data: Some([("kubeconfig".to_string(), kc)].into_iter().collect()),
        ..ConfigMap::default()
    }
}

/// The name of the discovery ConfigMap in kube-public.
pub const CLUSTER_INFO: &str = "cluster-info";

/// Create the token Secret, the bindings and kube-public/cluster-info (readable by anyone, as
/// kubeadm makes it). kube-system may not exist for a moment after /readyz, so the caller
/// retries on error.
pub async fn apply(
    client: &Client,
    token: &BootstrapToken,
    cluster_info: &ConfigMap,
) -> Result<(), kube::Error> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "kube-system");
    ensure(&secrets, &token.secret_object()).await?;
    let crbs: Api<ClusterRoleBinding> = Api::all(client.clone());
    for (name, role, group) in BINDINGS {
        ensure(&crbs, &binding_object(name, role, group)).await?;
    }
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "kube-public");
    ensure(&cms, cluster_info).await?;
    let name = "kubeadm:bootstrap-signer-clusterinfo";
    let meta = ObjectMeta {
        name: Some(name.into()),
        namespace: Some("kube-public".into()),
        ..ObjectMeta::default()
    };
    let role = Role {
        metadata: meta.clone(),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["configmaps".into()]),
            resource_names: Some(vec![CLUSTER_INFO.into()]),
            verbs: vec!["get".into()],
            ..PolicyRule::default()
        }]),
    };
    ensure(
        &Api::<Role>::namespaced(client.clone(), "kube-public"),
        &role,
    )
    .await?;
    let binding = RoleBinding {
        metadata: meta,
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: name.into(),
        },
        subjects: Some(vec![Subject {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "User".into(),
            name: "system:anonymous".into(),
            namespace: None,
        }]),
    };
    ensure(
        &Api::<RoleBinding>::namespaced(client.clone(), "kube-public"),
        &binding,
    )
    .await?;
    Ok(())
}

/// Whether the controller-manager has started its controllers: the service-account controller
/// gives every namespace a `default` ServiceAccount.
pub async fn controllers_running(client: &Client) -> bool {
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
    matches!(sas.get_opt("default").await, Ok(Some(_)))
}

/// GET /readyz: Ok when the API server says it is ready.
pub async fn api_ready(client: &Client) -> bool {
    let req = match http::Request::get("/readyz").body(Vec::new()) {
        Ok(r) => r,
        Err(_) => return false,
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(5), client.request_text(req)).await,
        Ok(Ok(t)) if t.trim() == "ok"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_have_kubeadm_format_and_round_trip() {
        let t = BootstrapToken::from_random([255; 22]);
        let s = t.to_string();
        assert_eq!(s.len(), 23, "{s}");
        assert_eq!(BootstrapToken::parse(&s).expect("parse"), t);
        let t = BootstrapToken::from_random(std::array::from_fn(|i| i as u8 * 7));
        assert_eq!(BootstrapToken::parse(&t.to_string()).expect("parse"), t);
        assert!(
            !format!("{t:?}").contains(&t.secret),
            "Debug hides the secret"
        );
    }

    #[test]
    fn malformed_tokens_are_refused() {
        for bad in [
            "",
            "abcdef",
            "abcdef.0123",
            "ABCDEF.0123456789abcdef",
            "abcdef:0123456789abcdef",
        ] {
            assert!(BootstrapToken::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(BootstrapToken::parse("abcdef.0123456789abcdef\n").is_ok());
    }

    #[test]
    fn the_secret_carries_what_the_authenticator_reads() {
        let t = BootstrapToken::parse("abcdef.0123456789abcdef").expect("parse");
        let s = t.secret_object();
        assert_eq!(s.metadata.name.as_deref(), Some("bootstrap-token-abcdef"));
        assert_eq!(s.type_.as_deref(), Some("bootstrap.kubernetes.io/token"));
        let d = s.string_data.expect("data");
        assert_eq!(d["token-secret"], "0123456789abcdef");
        assert_eq!(d["usage-bootstrap-authentication"], "true");
        assert_eq!(d["auth-extra-groups"], BOOTSTRAP_GROUP);
    }

    #[test]
    fn cluster_info_names_the_cluster_and_no_user() {
        let cm = cluster_info_object("https://10.0.2.100:6443", "CA");
        let kc = &cm.data.expect("data")["kubeconfig"];
        assert!(kc.contains("server: https://10.0.2.100:6443"), "{kc}");
        assert!(!kc.contains("users:") && !kc.contains("token"), "{kc}");
        let parsed = kube::config::Kubeconfig::from_yaml(kc).expect("yaml");
        assert_eq!(parsed.clusters.len(), 1);
    }

    #[test]
    fn kubeconfig_parses_with_kube_rs() {
        let text = kubeconfig(
            "https://127.0.0.1:6443",
            "-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n",
            "admin",
            Credentials::Token("abcdef.0123456789abcdef"),
        );
        let kc = kube::config::Kubeconfig::from_yaml(&text).expect("yaml");
        assert_eq!(kc.current_context.as_deref(), Some("admin@keelos"));
        let cluster = kc.clusters[0].cluster.as_ref().expect("cluster");
        assert_eq!(cluster.server.as_deref(), Some("https://127.0.0.1:6443"));
    }
}
