//! Where the agent reaches the node's boot disk and runs installs: [`FileDisk`] opens a block
//! device or image file (its I/O blocks, so it runs on tokio's blocking pool); the simulation
//! (sim/) implements [`NodeDisk`] over crash-model disks on turmoil's single-threaded hosts.
//!
//! This module owns only how the disk is reached. It never decides what is read or written:
//! the handlers (bootctl's store) and the install driver ([`super::install`]) do.

use super::board::Ticket;
use super::install::{self, Job};
use super::service::InstallView;
use crate::block::{BlockDevice, FileDevice};
use crate::fetch::{Connect, Fetcher};
use std::future::Future;
use std::path::PathBuf;
use tonic::Status;

/// The boot disk as the agent's handlers reach it.
pub trait NodeDisk: Send + Sync + std::fmt::Debug + 'static {
    type Dev: BlockDevice;

    /// Run `f` on the boot disk (opened for writing when `write`). A disk that cannot be opened
    /// answers `UNAVAILABLE`.
    fn with_dev<T, F>(&self, write: bool, f: F) -> impl Future<Output = Result<T, Status>> + Send
    where
        T: Send + 'static,
        F: FnOnce(&mut Self::Dev) -> Result<T, Status> + Send + 'static;

    /// Start `job` on a task of its own, publishing on `ticket` until it ends: it goes on when
    /// the caller that asked for it goes away.
    fn spawn_install<C: Connect>(&self, job: Job, fetcher: Fetcher<C>, ticket: Ticket<InstallView>);
}

/// The boot disk as a file or block device, the checkpoint on STATE (keel-agent on a node).
#[derive(Debug, Clone)]
pub struct FileDisk {
    pub disk: PathBuf,
}

impl NodeDisk for FileDisk {
    type Dev = FileDevice;

    async fn with_dev<T, F>(&self, write: bool, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&mut FileDevice) -> Result<T, Status> + Send + 'static,
    {
        let disk = self.disk.clone();
        tokio::task::spawn_blocking(move || {
            let mut dev = FileDevice::open(&disk, write).map_err(|e| {
                Status::unavailable(format!("opening the boot disk {}: {e}", disk.display()))
            })?;
            f(&mut dev)
        })
        .await
        .map_err(|e| Status::internal(format!("the disk task stopped: {e}")))?
    }

    fn spawn_install<C: Connect>(
        &self,
        job: Job,
        fetcher: Fetcher<C>,
        ticket: Ticket<InstallView>,
    ) {
        tokio::spawn(install::run(job, fetcher, ticket));
    }
}
