//! The client side of the API, shared by osctl and the simulation (sim/): a connection to one
//! agent over mutual TLS, through any [`Connect`] (the operating system's TCP for osctl,
//! turmoil's in the simulation), with the calls an operator makes and the install stream.
//!
//! This module owns connecting and reading the API's answers. It never prints, never picks exit
//! codes and never retries a call on its own: osctl and the simulation's operators decide that.

use super::proto::{self, keel_client::KeelClient};
use super::tls::{self, ConnectError, Connector, TlsError};
use crate::fetch::{Connect, TcpConnect};
use crate::pki;
use std::sync::Arc;
use tonic::transport::Channel;
use tonic::Status;

/// Building a client failed (before any connection is tried).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("endpoint {0:?} is not HOST:PORT")]
    BadEndpoint(String),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// A connection to one agent. Connects lazily: a failure shows on the first call, with the
/// [`ConnectError`] in the error chain; [`Client::probe`] tells why.
#[derive(Debug, Clone)]
pub struct Client<C: Connect = TcpConnect> {
    keel: KeelClient<Channel>,
    probe: Connector<C>,
}

/// The host of `HOST:PORT` or `[V6]:PORT`.
pub fn host_of(endpoint: &str) -> Option<String> {
    if let Some(rest) = endpoint.strip_prefix('[') {
        return rest.split_once(']').map(|(h, _)| h.to_string());
    }
    let (h, p) = endpoint.rsplit_once(':')?;
    p.parse::<u16>().ok()?;
    Some(h.to_string())
}

impl Client {
    /// From an osctl configuration; `endpoint` overrides the configuration's.
    pub fn from_config(
        cfg: &pki::ClientConfig,
        endpoint: Option<&str>,
    ) -> Result<Client, ClientError> {
        let endpoint = endpoint.unwrap_or(&cfg.endpoint).to_string();
        let host = match cfg.server_name.clone() {
            Some(n) => n,
            None => host_of(&endpoint).ok_or_else(|| ClientError::BadEndpoint(endpoint.clone()))?,
        };
        let tls_cfg = tls::client_config(&cfg.ca, &cfg.cert, &cfg.key)?;
        Ok(Client::with_connect(TcpConnect, &endpoint, &host, tls_cfg)?)
    }
}

impl<C: Connect> Client<C> {
    /// The agent at `endpoint` (HOST:PORT) reached through `connect`; its certificate must name
    /// `server_name`.
    pub fn with_connect(
        connect: C,
        endpoint: &str,
        server_name: &str,
        tls_cfg: Arc<rustls::ClientConfig>,
    ) -> Result<Client<C>, TlsError> {
        let probe = Connector::with_connect(connect, endpoint, server_name, tls_cfg)?;
        let keel = KeelClient::new(tls::channel_with(probe.clone()));
        Ok(Client { keel, probe })
    }

    /// The agent's HOST:PORT.
    pub fn endpoint(&self) -> &str {
        self.probe.addr()
    }

    /// The generated gRPC client, for the calls without a helper here.
    pub fn keel(&mut self) -> &mut KeelClient<Channel> {
        &mut self.keel
    }

    /// After a call failed below gRPC: connect and handshake once to learn why (the agent's TLS
    /// alert, or an unreachable address).
    pub async fn probe(&self) -> Result<(), ConnectError> {
        self.probe.probe().await
    }

    pub async fn status(&mut self) -> Result<proto::StatusReply, Status> {
        Ok(self
            .keel
            .status(proto::StatusRequest {})
            .await?
            .into_inner())
    }

    /// Ask for an install. Refused with `FAILED_PRECONDITION` naming the running update when
    /// another one runs. Dropping the stream disconnects; the install goes on on the node.
    pub async fn install(&mut self, req: proto::InstallRequest) -> Result<InstallStream, Status> {
        Ok(InstallStream(
            self.keel.install_update(req).await?.into_inner(),
        ))
    }
}

/// The progress of an install as the agent streams it: progress events, then one result.
#[derive(Debug)]
pub struct InstallStream(tonic::Streaming<proto::InstallEvent>);

/// One event of an install stream.
#[derive(Debug, Clone, PartialEq)]
pub enum InstallEvent {
    Progress(proto::Progress),
    Result(proto::InstallResult),
}

impl InstallStream {
    /// The next event; `None` when the agent closed the stream.
    pub async fn next(&mut self) -> Result<Option<InstallEvent>, Status> {
        loop {
            let Some(ev) = self.0.message().await? else {
                return Ok(None);
            };
            match ev.event {
                Some(proto::install_event::Event::Progress(p)) => {
                    return Ok(Some(InstallEvent::Progress(p)))
                }
                Some(proto::install_event::Event::Result(r)) => {
                    return Ok(Some(InstallEvent::Result(r)))
                }
                None => {}
            }
        }
    }

    /// Follow the stream to its end, handing each progress event to `on_progress`. Returns the
    /// install's result, or `None` when the stream ended without one.
    pub async fn finish(
        mut self,
        mut on_progress: impl FnMut(&proto::Progress),
    ) -> Result<Option<proto::InstallResult>, Status> {
        let mut result = None;
        while let Some(ev) = self.next().await? {
            match ev {
                InstallEvent::Progress(p) => on_progress(&p),
                InstallEvent::Result(r) => result = Some(r),
            }
        }
        Ok(result)
    }
}
