//! A KeelOS node in a real Kubernetes cluster: the stock control plane (`keel-cluster`'s etcd,
//! kube-apiserver and kube-controller-manager) and a real OCI registry (Debian's
//! docker-registry, the pause image pushed with skopeo) run on the host's loopback; the guest
//! reaches both through QEMU guestfwds at 10.0.2.100. Tests talk to the API with kube-rs.
//!
//! One node carries the whole story (each boot under TCG costs minutes): it gets its address by
//! DHCP, is told to join with `osctl config apply` (a bootstrap token) and goes Ready; a pod pinned to it and a static pod from
//! its configuration run; a full update and reboot bring it back Ready on the new release with
//! the pod running again; an update whose kubelet cannot start rolls back by itself to the
//! release before, Ready again.

use crate::harness::timing;
use crate::node::{self, Node};
use k8s_openapi::api::core::v1::{Node as KubeNode, Pod};
use keelos::cluster::{ControlPlane, Options};
use kube::api::{Api, PostParams};
use std::time::{Duration, Instant};

/// The node's name in the cluster.
const NODE: &str = "keel-k8s";
const PAUSE_TAG: &str = keelos::image::oci::PAUSE_TAG;
/// The node's boot deadline: kubelet must answer its health endpoint, and the API server have
/// the node Ready, for the health window before it (stage 2 to healthy took 26 s here alone).
const KUBE_DEADLINE_SECS: u64 = 90;

struct Cluster {
    rt: tokio::runtime::Runtime,
    cp: ControlPlane,
    client: kube::Client,
    registry: keelos::cluster::registry::Registry,
    _dir: tempfile::TempDir,
}

impl Cluster {
    fn start() -> Cluster {
        let bin_dir = node::kube_binaries();
        let dir = crate::harness::scratch("kube-cluster");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let mut opts = Options::new(dir.path().join("cluster"));
        opts.bin_dir = bin_dir;
        let cp = rt
            .block_on(ControlPlane::start(&opts))
            .unwrap_or_else(|e| panic!("starting the control plane: {e}"));
        timing(
            "kubernetes",
            "control plane start (API ready, bootstrap objects, controllers)",
            cp.timings.controllers,
        );
        let client = rt
            .block_on(cp.admin_client())
            .unwrap_or_else(|e| panic!("admin client: {e}"));

        // the pause image keel-image makes, pushed to a real registry with skopeo
        let registry = keelos::cluster::registry::Registry::start(&dir.path().join("registry"))
            .unwrap_or_else(|e| panic!("{e}"));
        keelos::cluster::registry::push_pause_image(&registry, dir.path())
            .unwrap_or_else(|e| panic!("{e}"));
        Cluster {
            rt,
            cp,
            client,
            registry,
            _dir: dir,
        }
    }

    /// host:port of the registry as the guest names it.
    fn guest_registry(&self) -> String {
        format!("10.0.2.100:{}", self.registry.port)
    }

    fn pause_image(&self) -> String {
        format!("{}/pause:{PAUSE_TAG}", self.guest_registry())
    }

    /// The node configuration's `kubernetes` section for this cluster (keel-cluster's, as
    /// `keel-cluster up --registry --node-config` writes it) with a label, require_ready and a
    /// static pod.
    fn section(&self) -> serde_json::Value {
        let mut k = self
            .cp
            .guest_kubernetes_section(NODE, Some(self.registry.port))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(k["sandbox_image"], self.pause_image().as_str());
        k["node_labels"] = serde_json::json!({"keelos.dev/test": "kubernetes"});
        k["require_ready"] = true.into();
        k["static_pods"] = serde_json::json!([{
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "static-pause", "namespace": "default"},
            "spec": {"containers": [{"name": "pause", "image": self.pause_image()}]}
        }]);
        k
    }

    /// Create pod `name` in the default namespace with `spec`; returns when it was created.
    fn create_pod(&self, name: &str, spec: serde_json::Value) -> Instant {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default"},
            "spec": spec,
        }))
        .unwrap();
        let api: Api<Pod> = Api::namespaced(self.client.clone(), "default");
        let t0 = Instant::now();
        self.rt
            .block_on(api.create(&PostParams::default(), &pod))
            .unwrap_or_else(|e| panic!("creating pod {name}: {e}"));
        t0
    }

    fn node(&self) -> Option<KubeNode> {
        let api: Api<KubeNode> = Api::all(self.client.clone());
        self.rt.block_on(api.get_opt(NODE)).ok().flatten()
    }

    fn pod(&self, name: &str) -> Option<Pod> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), "default");
        self.rt.block_on(api.get_opt(name)).ok().flatten()
    }

    /// Wait until the node is Ready with `os_image`; returns its status.
    fn wait_ready(&mut self, os_image: &str, limit: Duration) -> KubeNode {
        let t0 = Instant::now();
        loop {
            if let Some(n) = self.node() {
                let info = n.status.as_ref().and_then(|s| s.node_info.as_ref());
                if ready(&n) && info.is_some_and(|i| i.os_image == os_image) {
                    return n;
                }
            }
            self.cp
                .check()
                .unwrap_or_else(|e| panic!("the control plane stopped: {e}"));
            assert!(
                t0.elapsed() < limit,
                "node {NODE} not Ready with osImage {os_image:?} after {limit:?}: {}",
                self.node()
                    .map(|n| serde_json::to_string(&n.status).unwrap())
                    .unwrap_or_else(|| "(no node object)".into())
            );
            std::thread::sleep(Duration::from_secs(2));
        }
    }

    /// Wait until pod `name` runs with its container started more than `restarts` times in
    /// all (a new sandbox after a reboot counts one more); returns the pod.
    fn wait_running(&self, name: &str, restarts: i32, limit: Duration) -> Pod {
        let t0 = Instant::now();
        loop {
            if let Some(p) = self.pod(name) {
                let st = p.status.as_ref();
                let phase = st.and_then(|s| s.phase.as_deref());
                let c = st
                    .and_then(|s| s.container_statuses.as_ref())
                    .and_then(|c| c.first());
                let running = c.is_some_and(|c| {
                    c.ready && c.state.as_ref().is_some_and(|s| s.running.is_some())
                });
                if phase == Some("Running")
                    && running
                    && c.is_some_and(|c| c.restart_count >= restarts)
                {
                    return p;
                }
            }
            assert!(
                t0.elapsed() < limit,
                "pod {name} not running after {limit:?}: {}",
                self.pod(name)
                    .map(|p| serde_json::to_string(&p.status).unwrap())
                    .unwrap_or_else(|| "(no pod object)".into())
            );
            std::thread::sleep(Duration::from_secs(2));
        }
    }
}

fn ready(n: &KubeNode) -> bool {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn restart_count(p: &Pod) -> i32 {
    p.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .map_or(0, |c| c.restart_count)
}

const READY_LIMIT: Duration = Duration::from_secs(420);

#[test]
fn a_kubernetes_node_joins_runs_pods_survives_an_update_and_rolls_back_a_broken_kubelet() {
    let test = "kubernetes";
    let mut cl = Cluster::start();
    let section = cl.section();
    let mut n = Node::with_config("kubernetes", "k1", |c| {
        // no network section: DHCP from QEMU's server; no kubernetes section yet
        c.as_object_mut().unwrap().remove("network");
        c["health"]["boot_deadline_secs"] = KUBE_DEADLINE_SECS.into();
    });
    n.forwards = vec![
        (cl.cp.ports.apiserver, cl.cp.ports.apiserver),
        (cl.registry.port, cl.registry.port),
    ];
    n.memory_mib = Some(2048);
    let r = node::releases();

    // (1) an unjoined node (no kubelet) gets its address by DHCP; `osctl config apply` with a
    // kubernetes section makes it join with the bootstrap token at once, and it goes Ready
    n.boot();
    n.wait_agent(Duration::from_secs(300));
    let services = n
        .osctl(&["--output", "json", "services"])
        .unwrap_or_else(|e| panic!("osctl services: {e}"));
    assert!(!services.contains("kubelet"), "{services}");
    let mut joined: serde_json::Value =
        serde_json::from_slice(&std::fs::read(n.dir.path().join("node.json")).unwrap()).unwrap();
    joined["kubernetes"] = section;
    let file = n.dir.path().join("joined.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&joined).unwrap()).unwrap();
    let t0 = Instant::now();
    let applied = n
        .osctl(&["config", "apply", file.to_str().unwrap()])
        .unwrap_or_else(|e| panic!("osctl config apply: {e}"));
    eprintln!("kubernetes: osctl config apply said:\n{applied}");
    assert!(
        applied.contains("applied now: kubelet: added and started"),
        "{applied}"
    );
    assert!(
        applied.contains("applied now: containerd: restarted with its new configuration"),
        "{applied}"
    );
    let k = cl.wait_ready("KeelOS 1.5.0", READY_LIMIT);
    timing(
        test,
        "osctl config apply (join) to node Ready",
        t0.elapsed(),
    );
    let info = k.status.unwrap().node_info.unwrap();
    assert_eq!(info.kernel_version, crate::versions().kernel_release);
    // Debian's 1.6.20~ds1-1+deb12u3 is upstream 1.6.20
    let v = crate::versions();
    let upstream = v.containerd_version.split(['~', '-']).next().unwrap();
    assert!(
        info.container_runtime_version
            .starts_with(&format!("containerd://{upstream}")),
        "{info:?}"
    );
    assert_eq!(
        info.kubelet_version,
        keelos::cluster::pinned("KUBE_VERSION").unwrap()
    );
    let labels = k.metadata.labels.unwrap_or_default();
    assert_eq!(
        labels.get("keelos.dev/test").map(String::as_str),
        Some("kubernetes")
    );
    let serial = n.vm().serial();
    assert!(
        serial.contains("DHCP lease 10.0.2.15"),
        "no DHCP lease in the serial log:\n{}",
        n.vm().tail(80)
    );
    let (st, _) = n.wait_booted_successful("a", Duration::from_secs(300));
    assert_eq!(st["os_version"], "KeelOS 1.5.0", "{st}");

    // (2) a pod pinned to the node, its image from the local registry; the static pod's mirror
    let t0 = cl.create_pod(
        "pinned",
        serde_json::json!({
            "nodeName": NODE,
            // the broken update keeps the node NotReady for minutes: without this the node
            // lifecycle controller evicts the pod after the default 300 s (as it should)
            "tolerations": [{"operator": "Exists", "effect": "NoExecute"}],
            "automountServiceAccountToken": false,
            "containers": [{"name": "pause", "image": cl.pause_image()}]
        }),
    );
    let p = cl.wait_running("pinned", 0, Duration::from_secs(300));
    timing(
        test,
        "pod created to Running (image pulled from the local registry)",
        t0.elapsed(),
    );
    let before = restart_count(&p);
    // a pod with volumes kubelet mounts (util-linux mount in the image): the projected service
    // account token and an emptyDir in memory, both tmpfs
    let t0 = cl.create_pod(
        "volumes",
        serde_json::json!({
            "nodeName": NODE,
            "containers": [{"name": "pause", "image": cl.pause_image(),
                "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]}],
            "volumes": [{"name": "scratch", "emptyDir": {"medium": "Memory"}}]
        }),
    );
    let v = cl.wait_running("volumes", 0, Duration::from_secs(300));
    timing(
        test,
        "pod with a token and a memory emptyDir created to Running",
        t0.elapsed(),
    );
    let mounts = v.spec.unwrap().containers[0]
        .volume_mounts
        .clone()
        .unwrap_or_default();
    assert!(
        mounts
            .iter()
            .any(|m| m.mount_path == "/var/run/secrets/kubernetes.io/serviceaccount"),
        "no service account token mounted: {mounts:?}"
    );
    let mirror = cl.wait_running(&format!("static-pause-{NODE}"), 0, Duration::from_secs(300));
    let annotations = mirror.metadata.annotations.unwrap_or_default();
    assert!(
        annotations.contains_key("kubernetes.io/config.mirror"),
        "static-pause-{NODE} is not a mirror pod: {annotations:?}"
    );

    // kubelet's memory with three pods running and nothing changing, from `osctl services`
    std::thread::sleep(Duration::from_secs(20));
    let out = n
        .osctl(&["--output", "json", "services"])
        .unwrap_or_else(|e| panic!("osctl services: {e}"));
    let services: serde_json::Value = serde_json::from_str(&out).unwrap();
    for s in services.as_array().unwrap() {
        let mib = s["rss_bytes"].as_u64().unwrap_or(0) as f64 / 1048576.0;
        eprintln!(
            "rss: kubernetes node, 2 pods, idle: {}: {mib:.1} MiB",
            s["name"]
        );
    }
    let kubelet = services
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "kubelet")
        .unwrap_or_else(|| panic!("no kubelet in {services}"));
    assert_eq!(kubelet["state"], "running", "{services}");
    assert!(kubelet["rss_bytes"].as_u64().unwrap_or(0) > 0, "{services}");
    // kubelet's log through the agent
    let logs = n
        .osctl(&["logs", "kubelet"])
        .unwrap_or_else(|e| panic!("osctl logs kubelet: {e}"));
    assert!(
        logs.contains("kubelet") && logs.lines().count() > 10,
        "osctl logs kubelet: {logs}"
    );

    // (3) a full update and reboot: Ready on the new release, the pod running again
    let p2 = n.publish("k2", false);
    let res = n
        .install(&p2, false)
        .unwrap_or_else(|e| panic!("osctl install k2: {e}"));
    assert_eq!(res["ok"], true, "{res}");
    let t0 = n.reboot();
    cl.wait_ready("KeelOS 1.6.0", READY_LIMIT);
    timing(
        test,
        "reboot into the update (firmware, boot stage, kexec, slot) to node Ready",
        t0.elapsed(),
    );
    cl.wait_running("pinned", before + 1, Duration::from_secs(300));
    let (st, _) = n.wait_booted_successful("b", Duration::from_secs(300));
    assert_eq!(st["os_version"], "KeelOS 1.6.0", "{st}");

    // (4) an update whose kubelet exits at once: no boot of it is healthy, the tries run out,
    // the node is back on 1.6.0 and Ready again
    let bad = n.publish("k-bad", false);
    let res = n
        .install(&bad, false)
        .unwrap_or_else(|e| panic!("osctl install k-bad: {e}"));
    assert_eq!(res["ok"], true, "{res}");
    let t0 = n.reboot();
    let limit = Duration::from_secs(3 * (KUBE_DEADLINE_SECS + 90) + 120);
    let (st, _) = n.wait_status(limit, "back on slot b after a rollback", |s| {
        s["booted_slot"] == "b" && s["rolled_back"] == true
    });
    timing(
        test,
        "broken kubelet: reboot to back on slot b",
        t0.elapsed(),
    );
    assert_eq!(st["os_version"], "KeelOS 1.6.0", "{st}");
    assert_eq!(st["rolled_back_from"], r.version("k-bad"), "{st}");
    assert_eq!(Node::slot(&st, "a")["state"], "failed", "{st}");
    eprintln!("kubernetes: Status after the rollback: {st}");
    assert!(
        st["last_rollback"].as_str().is_some_and(|r| !r.is_empty()),
        "no rollback reason in Status: {st}"
    );
    let serial = n.vm().serial();
    assert!(
        serial.contains("did not become healthy within"),
        "{}",
        n.vm().tail(60)
    );
    cl.wait_ready("KeelOS 1.6.0", READY_LIMIT);
    cl.wait_running("pinned", before + 2, Duration::from_secs(300));
}
