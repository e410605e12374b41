//! End to end on loopback: gen pki -> keel-agent on a disk image file -> osctl install from a
//! real HTTP server -> Status shows the staged slot. Full, delta, corrupt delta (fallback),
//! wrong digest, concurrent installs.
#![allow(clippy::unwrap_used, clippy::panic)]

mod agent_common;

use agent_common::{http_server, image, run_v1, sha, start_node_with, Node};
use keelos::agent::proto;
use keelos::pki::Role;
use std::process::Command;
use std::sync::atomic::Ordering;

const IMG_LEN: usize = 1_500_000;

fn osctl(cfg: &std::path::Path, args: &[String]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_osctl"))
        .arg("--config")
        .arg(cfg)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// osctl as the admin, on a blocking thread (the agent runs on this test's runtime).
async fn osctl_async(node: &Node, args: Vec<String>) -> (i32, String, String) {
    let (c, k) = node.role_paths(Role::Admin);
    let cfg = node.osctl_config(&c, &k);
    tokio::task::spawn_blocking(move || osctl(&cfg, &args))
        .await
        .unwrap()
}

async fn status(node: &Node) -> proto::StatusReply {
    node.client(Role::Reader)
        .status(proto::StatusRequest {})
        .await
        .unwrap()
        .into_inner()
}

fn slot<'a>(s: &'a proto::StatusReply, l: &str) -> &'a proto::SlotInfo {
    s.slots.iter().find(|x| x.slot == l).unwrap()
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_install_through_osctl_stages_the_inactive_slot() {
    let v1 = image(1, IMG_LEN);
    let node = start_node_with(|d| run_v1(d, &v1)).await;
    let srv = http_server().await;
    let v2 = image(2, IMG_LEN);
    srv.put("/v2.img", v2.clone());
    // the download is cut twice and resumed with Range requests
    srv.state.cuts.store(2, Ordering::SeqCst);
    srv.state.cut_after.store(400_000, Ordering::SeqCst);

    let before = status(&node).await;
    assert_eq!(before.booted_slot, "a");
    assert_eq!(slot(&before, "a").image.as_ref().unwrap().sha256, sha(&v1));

    let (code, out, err) = osctl_async(
        &node,
        strs(&[
            "--output",
            "json",
            "install",
            "--image",
            &srv.url("/v2.img"),
            "--sha256",
            &sha(&v2),
            "--version",
            "2.0",
        ]),
    )
    .await;
    assert_eq!(code, 0, "{out}\n{err}");
    let last: serde_json::Value =
        serde_json::from_str(&out[out.rfind("\n{").map_or(0, |i| i + 1)..])
            .unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(last["ok"], true, "{out}");
    assert_eq!(last["staged_slot"], "b");
    assert_eq!(last["fallback_used"], false);

    let s = status(&node).await;
    let b = slot(&s, "b");
    assert_eq!(b.state, "trying", "{b:?}");
    let img = b.image.as_ref().unwrap();
    assert_eq!(img.sha256, sha(&v2));
    assert_eq!(img.length, IMG_LEN as u64);
    assert_eq!(img.version, "2.0");
    assert_eq!(s.next_boot_slot, "b");
    // the running slot is untouched
    assert_eq!(slot(&s, "a").image.as_ref().unwrap().sha256, sha(&v1));
    let u = s.update.unwrap();
    assert!(!u.running);
    assert!(u.result.unwrap().ok);
    let ranges = srv.state.ranges.lock().unwrap().clone();
    assert!(
        ranges
            .iter()
            .filter(|r| r.starts_with("bytes=") && r.as_str() != "bytes=0-0")
            .count()
            >= 2,
        "{ranges:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_install_saves_bytes_and_a_corrupt_delta_falls_back() {
    let v1 = image(1, IMG_LEN);
    let node = start_node_with(|d| run_v1(d, &v1)).await;
    let srv = http_server().await;
    // v2 = v1 with a few changed regions
    let mut v2 = v1.clone();
    for i in (0..IMG_LEN).step_by(100_000) {
        v2[i..i + 500].copy_from_slice(&image(9, 500));
    }
    let mut patch = Vec::new();
    qbsdiff::Bsdiff::new(&v1, &v2).compare(&mut patch).unwrap();
    srv.put("/v2.img", v2.clone());
    srv.put("/v2.patch", patch.clone());
    let mut bad = patch.clone();
    let n = bad.len();
    bad[n / 2..].iter_mut().for_each(|b| *b ^= 0x5a);
    srv.put("/v2-bad.patch", bad);

    let mut c = node.client(Role::Admin);
    let run = |delta: &str| proto::InstallRequest {
        full_image_url: srv.url("/v2.img"),
        delta_url: srv.url(delta),
        is_delta: true,
        sha256: sha(&v2),
        version: "2.0".into(),
        ..Default::default()
    };
    let result = |evs: Vec<proto::InstallEvent>| {
        evs.into_iter()
            .find_map(|e| match e.event {
                Some(proto::install_event::Event::Result(r)) => Some(r),
                _ => None,
            })
            .unwrap()
    };
    let collect = |mut s: tonic::Streaming<proto::InstallEvent>| async move {
        let mut v = Vec::new();
        while let Some(e) = s.message().await.unwrap() {
            v.push(e);
        }
        v
    };
    let evs = collect(
        c.install_update(run("/v2.patch"))
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    let r = result(evs);
    assert!(r.ok, "{r:?}");
    assert!(!r.fallback_used, "{r:?}");
    assert!(r.bytes_saved > 0, "{r:?}");
    assert_eq!(r.bytes_saved, (IMG_LEN - patch.len()) as u64);
    let s = status(&node).await;
    assert_eq!(slot(&s, "b").image.as_ref().unwrap().sha256, sha(&v2));

    // corrupt delta: the engine falls back to the full image by itself
    let evs = collect(
        c.install_update(run("/v2-bad.patch"))
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    assert!(evs
        .iter()
        .any(|e| matches!(e.event, Some(proto::install_event::Event::Progress(_)))));
    let r = result(evs);
    assert!(r.ok, "{r:?}");
    assert!(r.fallback_used, "{r:?}");
    assert!(!r.fallback_reason.is_empty());
    assert_eq!(r.bytes_saved, 0);
    let s = status(&node).await;
    assert_eq!(slot(&s, "b").image.as_ref().unwrap().sha256, sha(&v2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_digest_fails_and_activates_nothing() {
    let v1 = image(1, IMG_LEN);
    let node = start_node_with(|d| run_v1(d, &v1)).await;
    let srv = http_server().await;
    srv.put("/v2.img", image(2, IMG_LEN));
    let wrong = sha(b"something else");
    let (code, out, err) = osctl_async(
        &node,
        strs(&[
            "install",
            "--image",
            &srv.url("/v2.img"),
            "--sha256",
            &wrong,
        ]),
    )
    .await;
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(err.contains("does not match its digest"), "{err}");
    let s = status(&node).await;
    assert_eq!(s.next_boot_slot, "a", "nothing was activated");
    assert!(!slot(&s, "b").bootable);
    assert!(slot(&s, "b").image.is_none());
    assert_eq!(slot(&s, "a").image.as_ref().unwrap().sha256, sha(&v1));

    // 404 and 500 from the image server: clean failures, nothing activated
    for path in ["/404", "/500"] {
        let (code, _, err) = osctl_async(
            &node,
            strs(&["install", "--image", &srv.url(path), "--sha256", &sha(&v1)]),
        )
        .await;
        assert_eq!(code, 1, "{err}");
        assert!(err.contains(&path[1..]), "{err}");
        assert_eq!(status(&node).await.next_boot_slot, "a");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_installs_exactly_one_runs() {
    let v1 = image(1, IMG_LEN);
    let node = start_node_with(|d| run_v1(d, &v1)).await;
    let srv = http_server().await;
    let v2 = image(2, IMG_LEN);
    srv.put("/v2.img", v2.clone());
    srv.state.slow.lock().unwrap().push("/v2.img".into());
    let req = |v: &str| proto::InstallRequest {
        full_image_url: srv.url("/v2.img"),
        sha256: sha(&v2),
        version: v.into(),
        ..Default::default()
    };
    let (mut c1, mut c2) = (node.client(Role::Admin), node.client(Role::Admin));
    let (r1, r2) = tokio::join!(
        c1.install_update(req("2.0-first")),
        c2.install_update(req("2.0-second"))
    );
    let (ok, busy) = match (r1, r2) {
        (Ok(s), Err(e)) | (Err(e), Ok(s)) => (s, e),
        (Ok(_), Ok(_)) => panic!("both installs were admitted"),
        (Err(a), Err(b)) => panic!("both refused: {a} / {b}"),
    };
    assert_eq!(busy.code(), tonic::Code::FailedPrecondition);
    assert!(
        busy.message().contains("already running"),
        "{}",
        busy.message()
    );
    assert!(
        busy.message().contains("2.0-"),
        "names the running update: {}",
        busy.message()
    );
    // the admitted install goes on when its client goes away; Status shows it
    drop(ok);
    let mut seen_running = false;
    loop {
        let s = status(&node).await;
        let u = s.update.clone().unwrap();
        if u.running {
            seen_running = true;
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        }
        assert!(u.result.unwrap().ok);
        assert_eq!(slot(&s, "b").image.as_ref().unwrap().sha256, sha(&v2));
        break;
    }
    assert!(seen_running);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_after_an_install_and_refusals() {
    let v1 = image(1, IMG_LEN);
    let node = start_node_with(|d| run_v1(d, &v1)).await;
    // Slot B holds nothing: a rollback is refused with the reason, nothing changes.
    let e = node
        .client(Role::Admin)
        .rollback(proto::RollbackRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.message().contains("not bootable"), "{}", e.message());
    assert_eq!(status(&node).await.next_boot_slot, "a");
    // Reboot only-if-staged with nothing staged: refused; on a host without keel-init a reboot
    // is unavailable, clearly.
    let e = node
        .client(Role::Operator)
        .reboot(proto::RebootRequest {
            only_if_staged: true,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(
        e.message().contains("no update is staged"),
        "{}",
        e.message()
    );
    let e = node
        .client(Role::Operator)
        .reboot(proto::RebootRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable);
    assert!(e.message().contains("--control"), "{}", e.message());
}
