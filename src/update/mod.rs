//! The update engine: installs a new OS image into the inactive slot, verified, resumable and
//! crash-proof, from a full image (raw or zstd-compressed) or a delta (BSDF2 or BSDIFF40)
//! against the running slot, falling back to the full image when the delta fails.
//!
//! [`engine`] is the sans-IO core (no devices, files, sockets, clocks or async runtime);
//! [`driver`] runs it over a [`crate::block::BlockDevice`] with blocking inputs. The pieces it
//! is made of are pure too: [`bspatch`] (patch application as a state machine), [`bsdf2`]
//! (the patch streams, and the format we make), [`zframes`] (resumable zstd frames),
//! [`record`] (what each slot holds) and [`checkpoint`]; [`manifest`] decides whether a signed
//! release may be installed.

pub mod bsdf2;
pub mod bspatch;
pub mod checkpoint;
pub mod driver;
pub mod engine;
pub mod manifest;
pub mod matcher;
pub mod record;
pub mod sqfsmap;
pub mod zframes;

pub use engine::{
    Action, Delta, Event, FlagChange, FullImage, Input, Install, InstallError, InstallPlan,
    PatchExpect, Phase, Progress, Report, Resume,
};
pub use record::SlotRecord;

/// Flush and checkpoint after this many image bytes, unless told otherwise.
pub const DEFAULT_CHECKPOINT_EVERY: u64 = 8 << 20;

#[cfg(test)]
mod tests;
