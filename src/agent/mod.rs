//! keel-agent: the gRPC management API of a KeelOS node, served over mutual TLS.
//!
//! This module owns the server side of the API: the mTLS listener ([`tls`]), who may call what
//! ([`roles`]), the shared update state ([`board`]), how the boot disk is reached ([`disk`]),
//! what the running image trusts for updates ([`trust`]), and the handlers ([`service`]) that
//! translate between protobuf messages and the core
//! (bootctl, the update engine, keel-init's control interface); and the client side that osctl
//! and the simulation share ([`client`]). Handlers never implement install or boot-flag logic
//! themselves, and nothing here ever serves plaintext.

pub mod board;
pub mod client;
pub mod control;
pub mod disk;
pub mod install;
pub mod roles;
pub mod running;
pub mod service;
pub mod tls;
pub mod trust;

/// Generated from proto/keel.proto.
#[allow(missing_debug_implementations, clippy::all, clippy::unwrap_used)]
pub mod proto {
    tonic::include_proto!("keel.v1");
}
