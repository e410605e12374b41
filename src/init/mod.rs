//! keel-init: PID 1 of a KeelOS node.
//!
//! One binary, two stages. Stage 1 ([`stage1`]) runs as /init in the initramfs: it mounts the
//! kernel file systems, loads modules, arms the watchdog, chooses and mounts a root slot and
//! switches to it. Stage 2 ([`stage2`]) is the slot's own keel-init: it reaps, supervises the
//! node's services, judges the boot healthy, serves the control socket and shuts the node down.
//!
//! The decisions are pure and unit-tested: [`backoff`], [`order`], [`health`], [`cmdline`],
//! module order in [`modules`], rotation in [`logfile`], partition and disk choice in
//! [`bootdisk`]. The rest performs them. keel-init never runs a shell, and PID 1 never panics
//! on input: a top-level error is logged and ends in a reboot.

pub mod backoff;
pub mod bootdisk;
pub mod cmdline;
pub mod health;
pub mod kexec;
pub mod kubefiles;
pub mod kubeready;
pub mod log;
pub mod logfile;
pub mod modules;
pub mod mounts;
pub mod net;
pub mod netup;
pub mod order;
pub mod server;
pub mod stage1;
pub mod stage2;
pub mod supervisor;
pub mod watchdog;

pub use log::log;
