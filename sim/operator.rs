//! The operators: turmoil clients that manage nodes through osctl's client code
//! (`keelos::agent::client`, gRPC over mutual TLS with the admin certificate), as an operator
//! at a terminal would: ask for an install and follow its stream; when the stream or the node
//! is lost, ask Status until the node runs no install, and issue the install again when the
//! node came back without it (a crash) or asked for a re-run (its retry budget ran out).

use crate::node::{SimConnect, Spec, AGENT_PORT};
use keelos::agent::client::{Client, InstallEvent, InstallStream};
use keelos::agent::proto;
use std::time::Duration;
use tonic::Code;

/// How long one call, or a silent install stream, may take before the operator gives up on it.
const CALL: Duration = Duration::from_secs(10);
/// How long a node may stay unreachable before the operator reports it.
const UNREACHABLE_FOR: Duration = Duration::from_secs(300);

/// A client for `node` with the admin certificate (osctl's code path, on turmoil's TCP).
pub fn client(node: &str) -> Client<SimConnect> {
    Client::with_connect(
        SimConnect,
        &format!("{node}:{AGENT_PORT}"),
        node,
        crate::pki().admin_tls(),
    )
    .expect("node names are valid TLS server names")
}

pub fn request(spec: &Spec) -> proto::InstallRequest {
    if let Some(url) = &spec.release_url {
        return proto::InstallRequest {
            release_url: url.clone(),
            ..Default::default()
        };
    }
    proto::InstallRequest {
        full_image_url: spec.full_url.clone(),
        delta_url: spec.delta_url.clone().unwrap_or_default(),
        is_delta: spec.delta_url.is_some(),
        sha256: spec.sha256.clone(),
        version: spec.version.clone(),
        ..Default::default()
    }
}

/// Whether a failed call failed below gRPC (the connection, not the agent's answer).
pub fn lost(st: &tonic::Status) -> bool {
    matches!(
        st.code(),
        Code::Unavailable
            | Code::Unknown
            | Code::Cancelled
            | Code::Internal
            | Code::DeadlineExceeded
    )
}

/// A connection that is replaced after any failure (a half-dead one would hang every call).
pub struct Conn {
    node: String,
    client: Option<Client<SimConnect>>,
}

impl Conn {
    pub fn new(node: &str) -> Self {
        Conn {
            node: node.into(),
            client: None,
        }
    }

    fn get(&mut self) -> &mut Client<SimConnect> {
        let node = self.node.clone();
        self.client.get_or_insert_with(|| client(&node))
    }

    /// Status, retried until the node answers (bounded by [`UNREACHABLE_FOR`]).
    pub async fn status(&mut self) -> Result<proto::StatusReply, String> {
        let start = tokio::time::Instant::now();
        loop {
            match tokio::time::timeout(CALL, self.get().status()).await {
                Ok(Ok(s)) => return Ok(s),
                Ok(Err(st)) if !lost(&st) => return Err(format!("{}: Status: {st}", self.node)),
                _ => self.client = None,
            }
            if start.elapsed() > UNREACHABLE_FOR {
                return Err(format!(
                    "{}: unreachable for {UNREACHABLE_FOR:?}",
                    self.node
                ));
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Status once the node runs no install.
    pub async fn settled(&mut self) -> Result<proto::StatusReply, String> {
        loop {
            let s = self.status().await?;
            if !s.update.as_ref().is_some_and(|u| u.running) {
                return Ok(s);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// InstallUpdate: the stream, or the refusal / loss.
    pub async fn start(&mut self, spec: &Spec) -> Result<InstallStream, tonic::Status> {
        match tokio::time::timeout(CALL, self.get().install(request(spec))).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(st)) => {
                if lost(&st) {
                    self.client = None;
                }
                Err(st)
            }
            Err(_) => {
                self.client = None;
                Err(tonic::Status::deadline_exceeded(
                    "no answer to InstallUpdate",
                ))
            }
        }
    }
}

/// Follows a stream to its end. Checks that progress never goes back within a phase. Returns
/// the result, or `None` when the stream was lost or stayed silent for [`CALL`].
pub async fn follow(
    stream: &mut InstallStream,
    stop_after: Option<usize>,
) -> Result<Option<proto::InstallResult>, String> {
    let mut last: Option<(i32, u64)> = None;
    let mut events = 0;
    loop {
        if stop_after.is_some_and(|n| events >= n) {
            return Ok(None);
        }
        let ev = match tokio::time::timeout(CALL, stream.next()).await {
            Ok(Ok(Some(ev))) => ev,
            _ => return Ok(None),
        };
        events += 1;
        match ev {
            InstallEvent::Progress(p) => {
                if let Some((phase, done)) = last {
                    if phase == p.phase && p.bytes_done < done {
                        return Err(format!(
                            "progress went back in phase {phase}: {done} then {}",
                            p.bytes_done
                        ));
                    }
                }
                last = Some((p.phase, p.bytes_done));
            }
            InstallEvent::Result(r) => {
                // Read on to the stream's end, as osctl does: dropping it earlier resets it,
                // and h2 times reset streams out on the real clock, not the simulated one.
                while let Ok(Ok(Some(_))) = tokio::time::timeout(CALL, stream.next()).await {}
                return Ok(Some(r));
            }
        }
    }
}

/// What an operator ends with for one node.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The install's result as Status confirmed it (`None`: the operator gave up issuing).
    pub result: Option<proto::InstallResult>,
    /// Status after the last install.
    pub status: proto::StatusReply,
    pub issues: u32,
    /// Install streams that ended without a result (the connection or the node was lost).
    pub streams_lost: u32,
    /// The agent's refusal of the last issue of a release install (its manifest or signature
    /// was refused, or could not be downloaded), before anything was written.
    pub refused: Option<String>,
}

/// How the agent words a release it refused before writing anything.
pub const RELEASE_REFUSED: &str = "refused, nothing was written";
/// ... and a refusal because the manifest or its signature could not be downloaded (worth
/// issuing again).
pub const RELEASE_NOT_DOWNLOADED: &str = "cannot download the";

/// Install `spec` on `node` through the API, issuing it up to `max_issues` times (after a lost
/// node or a "re-run the install" failure). The result counts once Status shows it: a result
/// read from a stream of an agent that died right after is not the node's word.
pub async fn install(node: &str, spec: &Spec, max_issues: u32) -> Result<Outcome, String> {
    let mut conn = Conn::new(node);
    let mut result = None;
    let mut issues = 0;
    let mut streams_lost = 0;
    let mut refused = None;
    while issues < max_issues {
        issues += 1;
        result = None;
        refused = None;
        match conn.start(spec).await {
            // A release refused before anything was written: final, unless only its download
            // failed (then issued again, like a "re-run the install").
            Err(st)
                if spec.release_url.is_some()
                    && st.code() == Code::FailedPrecondition
                    && st.message().contains(RELEASE_REFUSED) =>
            {
                refused = Some(st.message().to_string());
                if st.message().contains(RELEASE_NOT_DOWNLOADED) {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                break;
            }
            Ok(mut stream) => {
                let r = follow(&mut stream, None)
                    .await
                    .map_err(|e| format!("{node}: {e}"))?;
                if r.is_none() {
                    // A lost stream: the next calls go over a new connection (the old one
                    // may be dead, and it holds a reset stream).
                    streams_lost += 1;
                    conn.client = None;
                }
            }
            // Our own earlier request whose answer was lost: follow it through Status.
            Err(st) if st.code() == Code::FailedPrecondition => {
                if !st.message().contains(&spec.sha256) {
                    return Err(format!("{node}: refused for another update: {st}"));
                }
            }
            Err(st) if lost(&st) => {}
            Err(st) => return Err(format!("{node}: InstallUpdate refused: {st}")),
        }
        let s = conn.settled().await?;
        let Some(u) = s.update else {
            continue; // the agent restarted: the node was lost mid-install
        };
        if u.sha256 != spec.sha256 || u.version != spec.version {
            return Err(format!("{node}: Status shows another update: {}", u.id));
        }
        result = u.result;
        match &result {
            Some(r) if !r.ok && r.error.contains("re-run the install") => continue,
            Some(_) => break,
            None => continue,
        }
    }
    let status = conn.status().await?;
    Ok(Outcome {
        result,
        status,
        issues,
        streams_lost,
        refused,
    })
}
