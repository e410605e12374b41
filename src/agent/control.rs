//! The interface through which the agent reaches keel-init (PID 1): services, their logs, and
//! reboot. keel-init implements it over its control socket (/run/keel/init.sock, protocol in
//! `src/control`); on a host without keel-init the agent uses [`Unavailable`], which answers
//! every call with a clear reason.
//!
//! This module owns the trait only. It never starts, stops or signals a process itself.

use std::future::Future;
use std::pin::Pin;

/// One supervised service, as keel-init reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceView {
    pub name: String,
    pub state: String,
    pub pid: u32,
    pub restarts: u32,
    pub detail: String,
    /// Resident memory of the running process, bytes (0: not running or not known).
    pub rss_bytes: u64,
}

/// A control call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// There is no keel-init to ask.
    #[error("{0}")]
    Unavailable(String),
    #[error("no service named {0:?}; `osctl services` lists them")]
    NoSuchService(String),
    #[error("keel-init refused: {0}")]
    Refused(String),
}

pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = Result<T, ControlError>> + Send + 'a>>;

/// A stream of log lines; `None` ends it.
pub type LogStream = tokio::sync::mpsc::Receiver<String>;

/// What keel-init offers the agent.
pub trait NodeControl: Send + Sync + std::fmt::Debug {
    fn services(&self) -> BoxFut<'_, Vec<ServiceView>>;
    fn restart(&self, name: String) -> BoxFut<'_, String>;
    /// Lines of `service`'s log: the last `tail` (0: all kept), then new ones when `follow`.
    fn logs(&self, service: String, follow: bool, tail: u32) -> BoxFut<'_, LogStream>;
    fn reboot(&self) -> BoxFut<'_, ()>;
    /// Have keel-init take on the stored configuration's version of `services` now; what it
    /// did, in words. keel-inits and test doubles without it refuse.
    fn reload(&self, services: Vec<String>) -> BoxFut<'_, Vec<String>> {
        let _ = services;
        Box::pin(async {
            Err(ControlError::Unavailable(
                "this node control cannot reload services".into(),
            ))
        })
    }
}

/// The agent on a host: no keel-init, so no services, logs or reboot.
#[derive(Debug, Clone, Default)]
pub struct Unavailable;

const WHY: &str = "keel-agent was started without --control: no keel-init to manage services, \
                   logs or reboot on this host (on a KeelOS node keel-init passes \
                   --control /run/keel/init.sock)";

impl NodeControl for Unavailable {
    fn services(&self) -> BoxFut<'_, Vec<ServiceView>> {
        Box::pin(async { Err(ControlError::Unavailable(WHY.into())) })
    }
    fn restart(&self, _: String) -> BoxFut<'_, String> {
        Box::pin(async { Err(ControlError::Unavailable(WHY.into())) })
    }
    fn logs(&self, _: String, _: bool, _: u32) -> BoxFut<'_, LogStream> {
        Box::pin(async { Err(ControlError::Unavailable(WHY.into())) })
    }
    fn reboot(&self) -> BoxFut<'_, ()> {
        Box::pin(async { Err(ControlError::Unavailable(WHY.into())) })
    }
}

/// keel-init over its control socket (protocol in `src/control`). Each call opens a connection;
/// the blocking client runs on tokio's blocking pool.
#[derive(Debug, Clone)]
pub struct InitSocket {
    pub path: std::path::PathBuf,
    pub timeout: std::time::Duration,
}

impl InitSocket {
    pub fn new(path: impl Into<std::path::PathBuf>) -> Self {
        InitSocket {
            path: path.into(),
            timeout: std::time::Duration::from_secs(10),
        }
    }

    async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut crate::control::Client) -> Result<T, crate::control::ControlError>
            + Send
            + 'static,
    ) -> Result<T, ControlError> {
        let (path, timeout) = (self.path.clone(), self.timeout);
        tokio::task::spawn_blocking(move || {
            let mut c = crate::control::Client::connect(&path, timeout).map_err(from_init)?;
            f(&mut c).map_err(from_init)
        })
        .await
        .map_err(|e| ControlError::Unavailable(format!("control call did not finish: {e}")))?
    }
}

fn from_init(e: crate::control::ControlError) -> ControlError {
    use crate::control::ControlError as E;
    match e {
        E::Refused(m) if m.contains("no service") => ControlError::NoSuchService(m),
        E::Refused(m) => ControlError::Refused(m),
        E::Connect { .. } => ControlError::Unavailable(e.to_string()),
        other => ControlError::Refused(other.to_string()),
    }
}

fn state_name(s: &crate::control::ServiceStatus) -> String {
    serde_json::to_value(s.state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{:?}", s.state).to_lowercase())
}

impl NodeControl for InitSocket {
    fn services(&self) -> BoxFut<'_, Vec<ServiceView>> {
        Box::pin(async move {
            let list = self.call(|c| c.list_services()).await?;
            Ok(list
                .into_iter()
                .map(|s| ServiceView {
                    state: state_name(&s),
                    name: s.name,
                    pid: s.pid.map_or(0, |p| p.max(0) as u32),
                    restarts: s.restarts,
                    rss_bytes: s.rss_kib.unwrap_or(0).saturating_mul(1024),
                    detail: [
                        s.uptime_secs.map(|u| format!("up {u}s")),
                        s.last_exit.map(|e| format!("last run {e}")),
                        s.error,
                    ]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join("; "),
                })
                .collect())
        })
    }

    fn reload(&self, services: Vec<String>) -> BoxFut<'_, Vec<String>> {
        Box::pin(async move { self.call(move |c| c.reload(&services)).await })
    }

    fn restart(&self, name: String) -> BoxFut<'_, String> {
        Box::pin(async move {
            let n = name.clone();
            self.call(move |c| c.restart(&n)).await?;
            Ok(format!("service {name} restarted"))
        })
    }

    fn logs(&self, service: String, follow: bool, tail: u32) -> BoxFut<'_, LogStream> {
        Box::pin(async move {
            // keel-init counts bytes; a line is taken as at most 256 bytes of tail
            let tail_bytes = (tail > 0).then(|| u64::from(tail) * 256);
            let (tx, rx) = tokio::sync::mpsc::channel(64);
            let closer = tx.clone();
            let (thread_done, ended) = tokio::sync::oneshot::channel::<()>();
            let (path, timeout) = (self.path.clone(), self.timeout);
            let first = tokio::task::spawn_blocking(move || {
                let mut c = crate::control::Client::connect(&path, timeout).map_err(from_init)?;
                if !follow {
                    // fed to the channel after this returns: the reader only gets the receiver
                    // then, and the channel holds 64 lines
                    let text = c.logs(&service, tail_bytes).map_err(from_init)?;
                    return Ok(Err(text));
                }
                let stream = c.follow_logs(&service, tail_bytes).map_err(from_init)?;
                let hang_up = stream.hang_up_handle().map_err(from_init)?;
                std::thread::spawn(move || {
                    let _done = thread_done;
                    let mut partial = String::new();
                    for chunk in stream {
                        let Ok(chunk) = chunk else { break };
                        partial.push_str(&chunk);
                        while let Some(i) = partial.find('\n') {
                            let line: String = partial.drain(..=i).collect();
                            if tx.blocking_send(line.trim_end().to_string()).is_err() {
                                return;
                            }
                        }
                    }
                });
                Ok(Ok(hang_up))
            });
            let first = first.await.map_err(|e| {
                ControlError::Unavailable(format!("control call did not finish: {e}"))
            })??;
            match first {
                // The reader of a quiet log may leave while the thread waits for output: hang
                // up then, so that the thread here and keel-init's end with the stream, not at
                // the service's next line.
                Ok(sock) => {
                    tokio::spawn(async move {
                        tokio::select! {
                            _ = closer.closed() => {
                                let _ = sock.shutdown(std::net::Shutdown::Both);
                            }
                            _ = ended => {}
                        }
                    });
                }
                Err(text) => {
                    tokio::spawn(async move {
                        for line in text.lines() {
                            if closer.send(line.to_string()).await.is_err() {
                                break;
                            }
                        }
                    });
                }
            }
            Ok(rx)
        })
    }

    fn reboot(&self) -> BoxFut<'_, ()> {
        Box::pin(async move { self.call(|c| c.reboot()).await })
    }
}
