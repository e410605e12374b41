//! What a slot carries for the boot stage, and what the ESP says about the boot stage: the
//! paths inside a slot's root image, and the two small JSON records (`/boot/keel-boot.json` in
//! the slot, `/keel/boot-stage.json` on the ESP).
//!
//! Shared by keel-image (which writes them) and keel-init (which reads them on a node), so it
//! holds only the paths and the serde types: no I/O, no tools, nothing else from the image
//! pipeline.

/// The slot's kernel (bzImage), relative to the slot's root.
pub const SLOT_KERNEL: &str = "boot/vmlinuz";
/// The slot's initramfs (zstd newc archive), relative to the slot's root.
pub const SLOT_INITRAMFS: &str = "boot/initramfs.img";
/// The record of the slot's kernel and initramfs ([`BootFiles`]), relative to the slot's root.
pub const SLOT_BOOT_RECORD: &str = "boot/keel-boot.json";
/// The boot stage's UKI on the ESP (the removable-media path UEFI firmware boots).
pub const ESP_UKI: &str = "EFI/BOOT/BOOTX64.EFI";
/// The record of the boot stage on the ESP ([`BootStageRecord`]).
pub const ESP_BOOT_STAGE_RECORD: &str = "keel/boot-stage.json";

/// `/boot/keel-boot.json` of a slot: the kernel and initramfs the boot stage hands to
/// `kexec_file_load`, described so that it can check them before trusting them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BootFiles {
    /// `uname -r` of the slot's kernel (its modules are under /lib/modules/<this>).
    pub kernel_release: String,
    /// SHA-256 of [`SLOT_KERNEL`], lowercase hex.
    pub kernel_sha256: String,
    /// Length of [`SLOT_KERNEL`] in bytes.
    pub kernel_len: u64,
    /// SHA-256 of [`SLOT_INITRAMFS`], lowercase hex.
    pub initramfs_sha256: String,
    /// Length of [`SLOT_INITRAMFS`] in bytes.
    pub initramfs_len: u64,
}

/// `/keel/boot-stage.json` on the ESP: which boot stage the disk starts with.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BootStageRecord {
    /// The KeelOS version of the release the boot stage was made from.
    pub version: String,
    /// `uname -r` of the boot stage's kernel.
    pub kernel_release: String,
    /// The kernel command line built into the UKI.
    pub cmdline: String,
    /// SHA-256 of [`ESP_UKI`], lowercase hex.
    pub uki_sha256: String,
    /// Length of [`ESP_UKI`] in bytes.
    pub uki_len: u64,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn boot_files_use_the_documented_field_names() {
        let b = BootFiles {
            kernel_release: "6.1.0-47-amd64".into(),
            kernel_sha256: "ab".into(),
            kernel_len: 1,
            initramfs_sha256: "cd".into(),
            initramfs_len: 2,
        };
        let v: serde_json::Value = serde_json::to_value(&b).unwrap();
        for k in [
            "kernel_release",
            "kernel_sha256",
            "kernel_len",
            "initramfs_sha256",
            "initramfs_len",
        ] {
            assert!(v.get(k).is_some(), "{k} missing from {v}");
        }
        assert_eq!(serde_json::from_value::<BootFiles>(v).unwrap(), b);
    }
}
