//! KeelOS: an immutable, API-driven node OS for Kubernetes.
//!
//! The library holds everything the binaries (`keel-image` and, later, `keel-init`,
//! `keel-agent`, `osctl`) are made of. The core that decides what is written where and what
//! boots (`bootctl`, `disk`'s table logic) does no I/O of its own beyond the [`block::BlockDevice`]
//! it is handed, reads no clock and uses no async runtime.

pub mod agent;
pub mod block;
pub mod bootctl;
pub mod cluster;
pub mod config;
pub mod control;
pub mod disk;
pub mod dm;
pub mod fetch;
pub mod image;
pub mod init;
pub mod kube;
pub mod net;
pub mod pki;
pub mod update;
pub mod verity;
