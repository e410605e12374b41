//! The agent's node-facing calls: the node configuration on STATE (GetConfig / ApplyConfig) and
//! services, logs and restarts through the real keel-init, run as PID 1 of a PID namespace
//! (`unshare`, as root: the test command runs as root) with its control socket in a temp dir.

#![allow(clippy::panic, clippy::unwrap_used)] // a test crate: failing loudly is its job

mod agent_common;

use agent_common::*;
use keelos::agent::control::InitSocket;
use keelos::agent::proto;
use keelos::config::{NodeConfig, ServiceConfig};
use keelos::pki::Role;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const KEEL_INIT: &str = env!("CARGO_BIN_EXE_keel-init");

#[tokio::test]
async fn config_get_apply_dry_run_and_refusal() {
    let node = start_node().await;
    let path = node.dir.path().join("state/config/node.json");
    let mut admin = node.client(Role::Admin);
    // nothing stored yet: the defaults
    let got = admin
        .get_config(proto::GetConfigRequest {})
        .await
        .unwrap()
        .into_inner();
    let mut cfg: NodeConfig = serde_json::from_str(&got.json).unwrap();
    assert_eq!(cfg, NodeConfig::default());
    // an invalid configuration: every error listed, nothing written
    let mut bad = cfg.clone();
    bad.services
        .push(ServiceConfig::new("", "relative/path", &[]));
    bad.services.push(ServiceConfig::new("", "", &[]));
    let err = admin
        .apply_config(proto::ApplyConfigRequest {
            json: serde_json::to_string(&bad).unwrap(),
            dry_run: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("nothing was written"),
        "{}",
        err.message()
    );
    let problems = err.message().matches(';').count() + 1;
    assert!(problems >= 2, "every error listed: {}", err.message());
    assert!(!path.exists());
    let err = admin
        .apply_config(proto::ApplyConfigRequest {
            json: "{not json".into(),
            dry_run: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    // a dry run reports the change and writes nothing
    cfg.health.window_secs = 42;
    let json = serde_json::to_string(&cfg).unwrap();
    let r = admin
        .apply_config(proto::ApplyConfigRequest {
            json: json.clone(),
            dry_run: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!r.applied);
    assert_eq!(r.changes.len(), 1, "{:?}", r.changes);
    assert!(
        r.changes[0].starts_with("health.window_secs:"),
        "{:?}",
        r.changes
    );
    assert!(!path.exists());
    // applied: stored atomically, and read back
    let r = admin
        .apply_config(proto::ApplyConfigRequest {
            json,
            dry_run: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.applied);
    assert_eq!(keelos::config::load(&path).unwrap().unwrap(), cfg);
    let mut reader = node.client(Role::Reader);
    let got = reader
        .get_config(proto::GetConfigRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(serde_json::from_str::<NodeConfig>(&got.json).unwrap(), cfg);
}

struct Init {
    child: Child,
    _dir: tempfile::TempDir,
    sock: std::path::PathBuf,
}

impl Drop for Init {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_init() -> Init {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = NodeConfig {
        services: vec![
            ServiceConfig::new("keel-agent", "/bin/sleep", &["1000"]),
            ServiceConfig::new(
                "chatty",
                "/bin/sh",
                &["-c", "echo hello from chatty; exec sleep 1000"],
            ),
        ],
        ..NodeConfig::default()
    };
    cfg.health.required = vec!["keel-agent".into()];
    cfg.health.window_secs = 3000;
    cfg.health.boot_deadline_secs = 6000;
    cfg.watchdog.device = None;
    let config = dir.path().join("node.json");
    keelos::config::store(&config, &cfg).unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let cmdline = dir.path().join("cmdline");
    std::fs::write(&cmdline, "").unwrap();
    let sock = dir.path().join("run/init.sock");
    let child = Command::new("unshare")
        .args([
            "--pid",
            "--fork",
            "--mount-proc",
            "--kill-child",
            KEEL_INIT,
            "--stage",
            "2",
        ])
        .arg("--config")
        .arg(&config)
        .arg("--state-dir")
        .arg(&state)
        .arg("--control")
        .arg(&sock)
        .arg("--cmdline")
        .arg(&cmdline)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("unshare (util-linux) runs keel-init; the test command runs as root");
    let start = Instant::now();
    while keelos::control::Client::connect(&sock, Duration::from_secs(5)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "keel-init never served its socket"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Init {
        child,
        _dir: dir,
        sock,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn services_logs_and_restart_through_keel_init() {
    let init = start_init();
    let node = start_node_control(Arc::new(InitSocket::new(&init.sock))).await;
    let mut op = node.client(Role::Operator);
    // the services come up
    let start = Instant::now();
    let chatty = loop {
        let list = op
            .service_list(proto::ServiceListRequest {})
            .await
            .unwrap()
            .into_inner();
        if let Some(s) = list
            .services
            .iter()
            .find(|s| s.name == "chatty" && s.state == "running")
        {
            break s.clone();
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "chatty never ran: {list:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(chatty.pid > 0);
    // its log, through keel-init
    let start = Instant::now();
    loop {
        let mut s = op
            .logs(proto::LogsRequest {
                service: "chatty".into(),
                follow: false,
                tail_lines: 10,
            })
            .await
            .unwrap()
            .into_inner();
        let mut lines = Vec::new();
        while let Some(l) = s.message().await.unwrap() {
            lines.push(l.line);
        }
        if lines.iter().any(|l| l.contains("hello from chatty")) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no log line: {lines:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // a restart: a new pid and one more restart
    op.service_restart(proto::ServiceRestartRequest {
        name: "chatty".into(),
    })
    .await
    .unwrap();
    let start = Instant::now();
    loop {
        let list = op
            .service_list(proto::ServiceListRequest {})
            .await
            .unwrap()
            .into_inner();
        let s = list.services.iter().find(|s| s.name == "chatty").unwrap();
        if s.state == "running" && s.pid != chatty.pid && s.restarts > chatty.restarts {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no restart: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // an unknown service is named
    let err = op
        .service_restart(proto::ServiceRestartRequest {
            name: "nosuch".into(),
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("nosuch"), "{}", err.message());
}
