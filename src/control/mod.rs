//! The control protocol between keel-init and keel-agent over the Unix socket
//! `/run/keel/init.sock`, and the small blocking [`Client`] the agent uses.
//!
//! Each message is one line of JSON. A request carries the protocol version `v`; keel-init
//! answers a version it does not speak with an error naming the one it does. One request per
//! line, answered by one response line, except `logs` with `follow`, which is answered by
//! `log` lines until the client closes the connection. This module owns the message types and
//! the client; the server lives in keel-init (`init::server`). It never touches services itself.

pub mod boot;
pub mod journal;

use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The protocol version this code speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// Where keel-init listens on a node.
pub const SOCKET_PATH: &str = "/run/keel/init.sock";
/// The longest request line the server reads.
pub const MAX_LINE: usize = 64 * 1024;

/// A request to keel-init.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub v: u32,
    #[serde(flatten)]
    pub op: Op,
}

/// What is asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// The state of every supervised service.
    ListServices,
    /// Stop one service (SIGTERM, grace, SIGKILL) and start it again.
    Restart { service: String },
    /// The end of a service's log (`tail_bytes`, default 64 KiB); with `follow`, then every new
    /// byte until the client disconnects.
    Logs {
        service: String,
        #[serde(default)]
        follow: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tail_bytes: Option<u64>,
    },
    /// Read the node configuration again and take on its version of `services` (added,
    /// changed, removed; the rest keep theirs until the next boot), writing the Kubernetes
    /// files first when it has a `kubernetes` section.
    Reload { services: Vec<String> },
    /// Stop all services and reboot.
    Reboot,
    /// Stop all services and power off.
    PowerOff,
}

/// A service's condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceState {
    /// Waiting for the services it starts after.
    Waiting,
    Running,
    /// Exited; will be started again when its backoff delay has passed.
    Backoff,
    /// Being stopped (restart or shutdown).
    Stopping,
    /// Exited and not to be restarted (its policy says so).
    Stopped,
    /// Cannot be started: the binary is missing or an argument cannot be filled in.
    Failed,
    /// An optional service whose binary the image does not have.
    Absent,
}

/// VmRSS (KiB) from the text of /proc/PID/status.
pub fn vm_rss_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// One line of `list_services`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    pub state: ServiceState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    /// How often it was started again after its first start.
    pub restarts: u32,
    /// Seconds since the current run started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uptime_secs: Option<u64>,
    /// How the last run ended, e.g. "exited with status 1" or "killed by signal 9".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<String>,
    /// Why it is failed, when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The running process's resident memory (VmRSS), in KiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rss_kib: Option<u64>,
}

/// A reply from keel-init.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Response {
    Services {
        services: Vec<ServiceStatus>,
    },
    /// The request was carried out (or, for reboot and power off, has begun).
    Done,
    /// Log bytes (invalid UTF-8 replaced).
    Log {
        data: String,
    },
    /// What a reload did, in words (empty: nothing changed).
    Reloaded {
        changes: Vec<String>,
    },
    Error {
        message: String,
    },
}

/// A control request failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot reach keel-init at {path}: {source}; is keel-init running?")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to keel-init failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("keel-init closed the connection without answering")]
    Closed,
    #[error("keel-init sent a line this client cannot read ({0}); are both the same version?")]
    Garbled(String),
    #[error("keel-init refused: {0}")]
    Refused(String),
    #[error("keel-init answered {0:?}, which does not fit the request")]
    Unexpected(Box<Response>),
}

/// Encode one message as a line.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let mut v = serde_json::to_vec(msg).unwrap_or_else(|e| {
        format!(r#"{{"reply":"error","message":"cannot encode reply: {e}"}}"#).into_bytes()
    });
    v.push(b'\n');
    v
}

/// A blocking connection to keel-init.
#[derive(Debug)]
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    /// Connect to the socket at `path`. Replies are awaited for at most `timeout` (log follow
    /// streams excepted).
    pub fn connect(path: &Path, timeout: Duration) -> Result<Client, ControlError> {
        let s = UnixStream::connect(path).map_err(|source| ControlError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        Ok(Client {
            writer: s.try_clone()?,
            reader: BufReader::new(s),
        })
    }

    fn send(&mut self, op: Op) -> Result<(), ControlError> {
        let req = Request {
            v: PROTOCOL_VERSION,
            op,
        };
        self.writer.write_all(&encode(&req))?;
        Ok(())
    }

    fn receive(&mut self) -> Result<Response, ControlError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(ControlError::Closed);
        }
        match serde_json::from_str(&line) {
            Ok(Response::Error { message }) => Err(ControlError::Refused(message)),
            Ok(r) => Ok(r),
            Err(e) => Err(ControlError::Garbled(e.to_string())),
        }
    }

    fn call(&mut self, op: Op) -> Result<Response, ControlError> {
        self.send(op)?;
        self.receive()
    }

    fn expect_done(&mut self, op: Op) -> Result<(), ControlError> {
        match self.call(op)? {
            Response::Done => Ok(()),
            other => Err(ControlError::Unexpected(Box::new(other))),
        }
    }

    pub fn list_services(&mut self) -> Result<Vec<ServiceStatus>, ControlError> {
        match self.call(Op::ListServices)? {
            Response::Services { services } => Ok(services),
            other => Err(ControlError::Unexpected(Box::new(other))),
        }
    }

    pub fn restart(&mut self, service: &str) -> Result<(), ControlError> {
        self.expect_done(Op::Restart {
            service: service.to_string(),
        })
    }

    /// Have keel-init take on the stored configuration's version of `services`.
    pub fn reload(&mut self, services: &[String]) -> Result<Vec<String>, ControlError> {
        match self.call(Op::Reload {
            services: services.to_vec(),
        })? {
            Response::Reloaded { changes } => Ok(changes),
            other => Err(ControlError::Unexpected(Box::new(other))),
        }
    }

    /// The last `tail_bytes` (default 64 KiB) of a service's log.
    pub fn logs(&mut self, service: &str, tail_bytes: Option<u64>) -> Result<String, ControlError> {
        self.send(Op::Logs {
            service: service.to_string(),
            follow: false,
            tail_bytes,
        })?;
        let mut out = String::new();
        loop {
            match self.receive()? {
                Response::Log { data } => out.push_str(&data),
                Response::Done => return Ok(out),
                other => return Err(ControlError::Unexpected(Box::new(other))),
            }
        }
    }

    /// Follow a service's log: the tail, then new output as it is written. The stream ends
    /// when the connection is dropped.
    pub fn follow_logs(
        mut self,
        service: &str,
        tail_bytes: Option<u64>,
    ) -> Result<LogFollow, ControlError> {
        self.reader.get_ref().set_read_timeout(None)?;
        self.send(Op::Logs {
            service: service.to_string(),
            follow: true,
            tail_bytes,
        })?;
        Ok(LogFollow { client: self })
    }

    /// Ask keel-init to stop all services and reboot. Returns once it has begun.
    pub fn reboot(&mut self) -> Result<(), ControlError> {
        self.expect_done(Op::Reboot)
    }

    /// Ask keel-init to stop all services and power off. Returns once it has begun.
    pub fn power_off(&mut self) -> Result<(), ControlError> {
        self.expect_done(Op::PowerOff)
    }
}

/// A followed log: each item is a chunk of new output.
#[derive(Debug)]
pub struct LogFollow {
    client: Client,
}

impl LogFollow {
    /// A handle on the connection: shutting it down ends the follow on both sides (this
    /// iterator returns `None`; keel-init sees the hang-up and ends its thread), even while no
    /// new output arrives.
    pub fn hang_up_handle(&self) -> Result<UnixStream, ControlError> {
        Ok(self.client.writer.try_clone()?)
    }
}

impl Iterator for LogFollow {
    type Item = Result<String, ControlError>;
    fn next(&mut self) -> Option<Self::Item> {
        match self.client.receive() {
            Ok(Response::Log { data }) => Some(Ok(data)),
            Ok(Response::Done) | Err(ControlError::Closed) => None,
            Ok(other) => Some(Err(ControlError::Unexpected(Box::new(other)))),
            Err(e) => Some(Err(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format_is_stable() {
        let r = Request {
            v: 1,
            op: Op::Logs {
                service: "kubelet".into(),
                follow: true,
                tail_bytes: None,
            },
        };
        assert_eq!(
            String::from_utf8(encode(&r)).unwrap(),
            "{\"v\":1,\"op\":\"logs\",\"service\":\"kubelet\",\"follow\":true}\n"
        );
        let back: Request =
            serde_json::from_str(r#"{"v":1,"op":"restart","service":"containerd"}"#).unwrap();
        assert_eq!(
            back.op,
            Op::Restart {
                service: "containerd".into()
            }
        );
        let resp = Response::Services {
            services: vec![ServiceStatus {
                name: "keel-agent".into(),
                state: ServiceState::Running,
                pid: Some(7),
                restarts: 2,
                uptime_secs: Some(30),
                last_exit: None,
                error: None,
                rss_kib: Some(20480),
            }],
        };
        assert_eq!(
            String::from_utf8(encode(&resp)).unwrap(),
            "{\"reply\":\"services\",\"services\":[{\"name\":\"keel-agent\",\"state\":\"running\",\
             \"pid\":7,\"restarts\":2,\"uptime_secs\":30,\"rss_kib\":20480}]}\n"
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"v":1,"op":"power_off"}"#)
                .unwrap()
                .op,
            Op::PowerOff
        );
    }

    #[test]
    fn connecting_to_nothing_says_where() {
        let err = Client::connect(Path::new("/nonexistent/init.sock"), Duration::from_secs(1))
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/init.sock"), "{err}");
    }

    #[test]
    fn resident_memory_from_proc_status() {
        let own = std::fs::read_to_string("/proc/self/status").unwrap();
        assert!(vm_rss_kib(&own).is_some_and(|k| k > 0));
        let text = "Name:\tkubelet\nVmPeak:\t 2000 kB\nVmRSS:\t   48212 kB\nThreads:\t12\n";
        assert_eq!(vm_rss_kib(text), Some(48212));
        // a kernel thread has no VmRSS line
        assert_eq!(vm_rss_kib("Name:\tkthreadd\nState:\tS\n"), None);
    }
}
