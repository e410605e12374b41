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
