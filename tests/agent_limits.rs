//! Hostile or broken input stays bounded (issue 11, item 5), end to end on loopback: a server
//! that drips bytes, presigned URLs in errors, an oversized patch, a thousand log streams, a
//! connection flood, and a zstd bomb against the real keel-agent binary.
#![allow(clippy::unwrap_used, clippy::panic)]

mod agent_common;

use agent_common::{http_server, image, make_disk, node_config, run_v1, sha};
use keelos::agent::control::{BoxFut, ControlError, LogStream, NodeControl, ServiceView};
use keelos::agent::proto::{self, keel_client::KeelClient};
use keelos::agent::service::{serve, Agent, MAX_LOG_STREAMS};
use keelos::agent::tls;
use keelos::disk::MIB;
use keelos::fetch::MinRate;
use keelos::pki::{self, Role};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const IMG_LEN: usize = 1_000_000;

/// An agent on a disk file holding v1 in slot A, changed by `limits` before it serves.
struct TestNode {
    dir: tempfile::TempDir,
    addr: SocketAddr,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl TestNode {
    async fn start(
        v1: &[u8],
        control: Arc<dyn NodeControl>,
        limits: impl FnOnce(Agent) -> Agent,
    ) -> TestNode {
        let dir = tempfile::tempdir().unwrap();
        let pki_dir = dir.path().join("pki");
        pki::generate(&pki_dir, &["localhost".into(), "127.0.0.1".into()], None).unwrap();
        let disk = dir.path().join("disk.img");
        make_disk(&disk, 4 * MIB);
        run_v1(&disk, v1);
        let state = dir.path().join("state");
        std::fs::create_dir_all(&state).unwrap();
        let agent = limits(Agent::new(node_config(&disk, &state), control).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cfg = tls::server_config(&pki_dir).unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            serve(agent, listener, cfg, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        TestNode {
            dir,
            addr,
            _stop: tx,
        }
    }

    fn client(&self, role: Role) -> KeelClient<tonic::transport::Channel> {
        client(&self.dir.path().join("pki"), self.addr, role)
    }
}

fn client(pki_dir: &Path, addr: SocketAddr, role: Role) -> KeelClient<tonic::transport::Channel> {
    let cfg = tls::client_config(
        &pki_dir.join(pki::CA_CERT),
        &pki_dir.join(format!("{}.crt", role.name())),
        &pki_dir.join(format!("{}.key", role.name())),
    )
    .unwrap();
    KeelClient::new(tls::channel(&addr.to_string(), "localhost", cfg).unwrap())
}

/// Run an install as the admin and return its result.
async fn install(
    c: &mut KeelClient<tonic::transport::Channel>,
    req: proto::InstallRequest,
) -> proto::InstallResult {
    let mut s = c.install_update(req).await.unwrap().into_inner();
    let mut result = None;
    while let Some(e) = s.message().await.unwrap() {
        if let Some(proto::install_event::Event::Result(r)) = e.event {
            result = Some(r);
        }
    }
    result.unwrap()
}

fn full(url: String, img: &[u8]) -> proto::InstallRequest {
    proto::InstallRequest {
        full_image_url: url,
        sha256: sha(img),
        version: "2.0".into(),
        ..Default::default()
    }
}

/// A server that answers every request with a 1 MB body and sends one byte of it every
/// `every`: never silent long enough to trip the stall timeout.
async fn drip_server(every: Duration) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = tcp.read(&mut buf).await;
                let head = "HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\n";
                if tcp.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                loop {
                    if tcp.write_all(&[0x28]).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(every).await;
                }
            });
        }
    });
    addr
}

/// Guards the minimum download rate: without it this install runs for days (a byte every
/// 200 ms of a 1 MB image) and the outer timeout fails the test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_drips_bytes_fails_the_install_at_the_minimum_rate() {
    let v1 = image(1, IMG_LEN);
    let node = TestNode::start(&v1, Arc::new(keelos::agent::control::Unavailable), |a| {
        a.with_download_limits(
            Some(MinRate {
                bytes_per_second: 1024,
                window: Duration::from_secs(1),
            }),
            1 << 20,
        )
    })
    .await;
    let drip = drip_server(Duration::from_millis(200)).await;
    let mut c = node.client(Role::Admin);
    let url = format!("http://{drip}/v2.img");
    let r = tokio::time::timeout(
        Duration::from_secs(60),
        install(&mut c, full(url, &image(2, IMG_LEN))),
    )
    .await
    .expect("the install is still running after 60 s: no minimum rate applies");
    assert!(!r.ok, "{r:?}");
    assert!(r.error.contains("minimum of 1024 bytes/s"), "{}", r.error);
    assert!(r.error.contains("--fetch-min-rate"), "{}", r.error);
    assert!(r.error.contains("re-run the install"), "{}", r.error);
}

/// Guards URL redaction: a presigned URL's query and a URL's user information never reach
/// an error or Status (which the reader role sees).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presigned_urls_are_redacted_in_errors_and_status() {
    let v1 = image(1, IMG_LEN);
    let node = TestNode::start(&v1, Arc::new(keelos::agent::control::Unavailable), |a| a).await;
    let srv = http_server().await;
    let url = format!(
        "http://deploy:hunter2@{}/404?X-Amz-Credential=AKIDEXAMPLE&X-Amz-Signature=5ec7e7",
        srv.addr
    );
    let mut c = node.client(Role::Admin);
    let r = install(&mut c, full(url, &image(2, IMG_LEN))).await;
    assert!(!r.ok, "{r:?}");
    let status = node
        .client(Role::Reader)
        .status(proto::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let seen = format!("{r:?} {status:?}");
    for secret in ["hunter2", "deploy:", "AKIDEXAMPLE", "5ec7e7", "X-Amz"] {
        assert!(!seen.contains(secret), "{secret:?} leaked: {seen}");
    }
    let shown = status.update.unwrap().result.unwrap().error;
    assert!(
        shown.contains(&format!("http://{}/404?<redacted>", srv.addr)),
        "{shown}"
    );
    assert!(shown.contains("404"), "{shown}");
}

/// Guards the patch limit: a patch larger than the agent's limit is not downloaded (nor held
/// in memory); the install says why and goes on with the full image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_patch_over_the_limit_is_refused_and_the_full_image_used() {
    let v1 = image(1, IMG_LEN);
    let node = TestNode::start(&v1, Arc::new(keelos::agent::control::Unavailable), |a| {
        a.with_download_limits(None, 64 << 10)
    })
    .await;
    let srv = http_server().await;
    let v2 = image(2, IMG_LEN);
    srv.put("/v2.img", v2.clone());
    srv.put("/v2.patch", image(3, 300_000));
    let mut c = node.client(Role::Admin);
    let mut req = full(srv.url("/v2.img"), &v2);
    req.is_delta = true;
    req.delta_url = srv.url("/v2.patch");
    let r = install(&mut c, req).await;
    assert!(r.ok, "{r:?}");
    assert!(r.fallback_used, "{r:?}");
    assert!(
        r.fallback_reason.contains("65536-byte limit on a patch"),
        "{}",
        r.fallback_reason
    );
    assert!(
        r.fallback_reason.contains("--max-patch-size"),
        "{}",
        r.fallback_reason
    );
}

/// keel-init stand-in whose followed logs never end; counts the streams still open.
#[derive(Debug, Default)]
struct EndlessLogs {
    open: Mutex<Vec<tokio::sync::mpsc::Sender<String>>>,
}

impl EndlessLogs {
    fn live(&self) -> usize {
        self.open
            .lock()
            .unwrap()
            .iter()
            .filter(|t| !t.is_closed())
            .count()
    }
}

impl NodeControl for EndlessLogs {
    fn services(&self) -> BoxFut<'_, Vec<ServiceView>> {
        Box::pin(async { Ok(Vec::new()) })
    }
    fn restart(&self, _: String) -> BoxFut<'_, String> {
        Box::pin(async { Err(ControlError::Refused("not here".into())) })
    }
    fn logs(&self, _: String, _: bool, _: u32) -> BoxFut<'_, LogStream> {
        Box::pin(async move {
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            let _ = tx.send("first line".into()).await;
            self.open.lock().unwrap().push(tx);
            Ok(rx)
        })
    }
    fn reboot(&self) -> BoxFut<'_, ()> {
        Box::pin(async { Ok(()) })
    }
}

/// Guards the log stream limit: a reader opening 1,000 followed log streams gets
/// MAX_LOG_STREAMS of them (each costs a thread in the agent and in keel-init on a node), the
/// rest a clear refusal; the node keeps answering, and closed streams free their places.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_opening_1000_log_streams_gets_the_limit() {
    let v1 = image(1, 100_000);
    let logs = Arc::new(EndlessLogs::default());
    let node = TestNode::start(&v1, logs.clone(), |a| a).await;
    let reader = node.client(Role::Reader);
    let mut calls = Vec::new();
    for _ in 0..1000 {
        let mut c = reader.clone();
        calls.push(tokio::spawn(async move {
            c.logs(proto::LogsRequest {
                service: "kubelet".into(),
                follow: true,
                tail_lines: 0,
            })
            .await
        }));
    }
    let mut open = Vec::new();
    let mut refused = 0;
    for call in calls {
        // Without the limit, calls beyond the streams per connection wait forever.
        let answer = tokio::time::timeout(Duration::from_secs(60), call)
            .await
            .expect("a log call got no answer in 60 s: every stream was admitted");
        match answer.unwrap() {
            Ok(s) => open.push(s.into_inner()),
            // the log stream limit, or the limit on streams per connection (a client that
            // opens streams before it has the server's settings sees REFUSED_STREAM)
            Err(st) if st.code() == tonic::Code::ResourceExhausted => {
                assert!(st.message().contains("close one"), "{st:?}");
                refused += 1;
            }
            Err(st) => {
                assert!(format!("{st:?}").contains("REFUSED_STREAM"), "{st:?}");
                refused += 1;
            }
        }
    }
    assert_eq!(open.len(), MAX_LOG_STREAMS, "{refused} refused");
    assert_eq!(refused, 1000 - MAX_LOG_STREAMS);
    assert_eq!(logs.live(), MAX_LOG_STREAMS);
    let mut first = open.pop().unwrap();
    assert_eq!(first.message().await.unwrap().unwrap().line, "first line");
    // the node still answers
    node.client(Role::Reader)
        .status(proto::StatusRequest {})
        .await
        .unwrap();
    // closing streams gives their places back (and ends the streams behind them)
    drop(first);
    drop(open);
    let mut again = None;
    for _ in 0..200 {
        let mut c = reader.clone();
        if let Ok(s) = c
            .logs(proto::LogsRequest {
                service: "kubelet".into(),
                follow: true,
                tail_lines: 0,
            })
            .await
        {
            again = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(again.is_some(), "no log stream after the others closed");
    for _ in 0..200 {
        if logs.live() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(logs.live(), 1);
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Guards the connection limit: 300 peers that connect and never finish the handshake cost
/// the agent at most MAX_CONNECTIONS sockets; once they leave, a real client is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_flood_holds_at_most_the_connection_limit() {
    use keelos::agent::tls::MAX_CONNECTIONS;
    let v1 = image(1, 100_000);
    let node = TestNode::start(&v1, Arc::new(keelos::agent::control::Unavailable), |a| a).await;
    let before = open_fds();
    let mut flood = Vec::new();
    for _ in 0..300 {
        flood.push(tokio::net::TcpStream::connect(node.addr).await.unwrap());
    }
    // Wait until the agent has taken what it will take (no more fds appear for a while).
    let mut last = open_fds();
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = open_fds();
        if now == last && now >= before + 300 + MAX_CONNECTIONS {
            break;
        }
        last = now;
    }
    let agent_side = open_fds() - before - 300;
    assert!(
        agent_side <= MAX_CONNECTIONS + 8,
        "the agent holds {agent_side} sockets for 300 half-open peers"
    );
    drop(flood);
    let st = node
        .client(Role::Reader)
        .status(proto::StatusRequest {})
        .await;
    assert!(st.is_ok(), "{st:?}");
}

// ---------------------------------------------------------------------------------------------
// The zstd bomb against the real binary, whose peak RSS the kernel reports.

fn vm_hwm_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Guards bounded zstd decoding: 4 GiB of zeros in a few hundred KiB of zstd frames, sent to
/// a keel-agent whose slot holds 256 MiB, fails as too large for the slot, and the agent's
/// peak RSS stays under 64 MiB. The agent runs with a 1 GiB data limit, so that a regression
/// ends in a failed allocation rather than in a machine out of memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zstd_bomb_fails_as_too_large_in_bounded_memory() {
    use std::io::Read;
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let pki_dir = dir.path().join("pki");
    pki::generate(&pki_dir, &["localhost".into(), "127.0.0.1".into()], None).unwrap();
    let disk = dir.path().join("disk.img");
    make_disk(&disk, 256 * MIB);
    let state: PathBuf = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();

    let srv = http_server().await;
    let mut bomb = Vec::new();
    keelos::update::zframes::compress(
        std::io::repeat(0).take(4 << 30),
        &mut bomb,
        1,
        keelos::update::zframes::FRAME_SIZE,
    )
    .unwrap();
    assert!(bomb.len() < 1 << 20, "{} compressed bytes", bomb.len());
    srv.put("/bomb.zst", bomb);

    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_keel-agent"));
    cmd.arg("--disk")
        .arg(&disk)
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--pki")
        .arg(&pki_dir)
        .arg("--state-dir")
        .arg(&state)
        .arg("--booted-slot")
        .arg("a")
        .stdout(std::process::Stdio::piped());
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 1 << 30,
                rlim_max: 1 << 30,
            };
            if libc::setrlimit(libc::RLIMIT_DATA, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = Child(cmd.spawn().unwrap());
    let pid = child.0.id();
    let mut out = std::io::BufReader::new(child.0.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    let addr: SocketAddr = line
        .split_whitespace()
        .find_map(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));

    let mut c = client(&pki_dir, addr, Role::Admin);
    let r = install(
        &mut c,
        proto::InstallRequest {
            full_image_url: srv.url("/bomb.zst"),
            sha256: "00".repeat(32),
            version: "bomb".into(),
            ..Default::default()
        },
    )
    .await;
    let hwm = vm_hwm_kib(pid);
    println!("zstd bomb: keel-agent peak RSS (VmHWM) {hwm} KiB");
    assert!(!r.ok, "{r:?}");
    assert!(r.error.contains("larger than the slot"), "{}", r.error);
    assert!(hwm < 64 * 1024, "keel-agent peak RSS {hwm} KiB");
}
