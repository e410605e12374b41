//! Unified Kernel Images: systemd's EFI stub with the kernel, initramfs, command line and
//! os-release added as PE sections, the boot stage that UEFI firmware starts from the ESP.
//!
//! Holds a small PE/COFF header reader (pure: bytes in, headers out) and the builder, which
//! runs binutils' `objcopy` on a copy of the stub. The new sections are placed after the stub's
//! last section, each aligned to the stub's SectionAlignment, from the sizes of what they hold:
//! no fixed offsets, so a large initramfs cannot overlap the kernel. Writes only the output
//! path it is given; reads the stub, never changes it.

use super::ImageError;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Debian's systemd-boot-efi stub for x86-64.
pub const DEFAULT_STUB: &str = "/usr/lib/systemd/boot/efi/linuxx64.efi.stub";

/// The sections a KeelOS UKI carries, in the order they are added.
pub const SECTIONS: [&str; 4] = [".osrel", ".cmdline", ".linux", ".initrd"];

/// A PE file's headers could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeError {
    #[error("not a PE file: {0}")]
    NotPe(&'static str),
    #[error("truncated PE headers: {0} lies past the end of the file")]
    Truncated(&'static str),
    #[error("PE section {name} at RVA {rva:#x} (+{len:#x}) overlaps {other}")]
    Overlap {
        name: String,
        rva: u64,
        len: u64,
        other: String,
    },
}

/// One entry of a PE section table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeSection {
    pub name: String,
    /// Relative virtual address (from the image base).
    pub rva: u32,
    pub virtual_size: u32,
    pub raw_offset: u32,
    pub raw_size: u32,
}

impl PeSection {
    /// Where the section ends in memory: its virtual size from its RVA (the raw size, which is
    /// padded to FileAlignment, only when there is no virtual size).
    pub fn end(&self) -> u64 {
        let len = if self.virtual_size != 0 {
            self.virtual_size
        } else {
            self.raw_size
        };
        u64::from(self.rva) + u64::from(len)
    }

    /// The section's bytes in the file: its virtual size of them (the rest is file padding).
    pub fn data<'a>(&self, file: &'a [u8]) -> Result<&'a [u8], PeError> {
        let len = self.virtual_size.min(self.raw_size) as usize;
        let start = self.raw_offset as usize;
        file.get(start..start + len)
            .ok_or(PeError::Truncated("a section's raw data"))
    }
}

/// The parts of a PE image's headers that placing new sections needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeHeaders {
    /// PE32+ (64-bit) rather than PE32.
    pub pe32_plus: bool,
    pub image_base: u64,
    pub section_alignment: u32,
    pub file_alignment: u32,
    pub size_of_image: u32,
    pub sections: Vec<PeSection>,
}

fn u16_at(b: &[u8], at: usize, what: &'static str) -> Result<u16, PeError> {
    b.get(at..at + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or(PeError::Truncated(what))
}

fn u32_at(b: &[u8], at: usize, what: &'static str) -> Result<u32, PeError> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or(PeError::Truncated(what))
}

/// `b` (a signed PE file, such as a Debian kernel's bzImage) without its Authenticode
/// signature: the certificate table (data directory 4, which lies at the end of the file) cut
/// off and its directory entry zeroed. The rest is byte for byte the same, so a kernel loader
/// that ignores signatures still accepts it; one that checks them finds none.
pub fn strip_signature(b: &[u8]) -> Result<Vec<u8>, PeError> {
    if b.get(..2) != Some(b"MZ") {
        return Err(PeError::NotPe("no MZ signature"));
    }
    let pe = u32_at(b, 0x3c, "e_lfanew")? as usize;
    if b.get(pe..pe + 4) != Some(b"PE\0\0") {
        return Err(PeError::NotPe("no PE signature at e_lfanew"));
    }
    let opt = pe + 4 + 20;
    let dirs = match u16_at(b, opt, "the optional header")? {
        0x20b => opt + 112,
        0x10b => opt + 96,
        _ => return Err(PeError::NotPe("unknown optional header magic")),
    };
    let count = u32_at(b, dirs - 4, "the optional header")?;
    if count < 5 {
        return Err(PeError::NotPe("no certificate table directory"));
    }
    let entry = dirs + 8 * 4;
    let offset = u32_at(b, entry, "the certificate table entry")? as usize;
    let size = u32_at(b, entry + 4, "the certificate table entry")? as usize;
    if size == 0 {
        return Err(PeError::NotPe("the file carries no signature"));
    }
    if offset.checked_add(size) != Some(b.len()) {
        return Err(PeError::NotPe(
            "the certificate table does not end the file",
        ));
    }
    let mut out = b[..offset].to_vec();
    out[entry..entry + 8].fill(0);
    Ok(out)
}

fn u64_at(b: &[u8], at: usize, what: &'static str) -> Result<u64, PeError> {
    Ok(u64::from(u32_at(b, at, what)?) | (u64::from(u32_at(b, at + 4, what)?) << 32))
}

fn align_up(v: u64, a: u64) -> u64 {
    if a <= 1 {
        v
    } else {
        v.div_ceil(a) * a
    }
}

impl PeHeaders {
    /// Read the DOS stub, COFF header, optional header and section table of `b`.
    pub fn parse(b: &[u8]) -> Result<Self, PeError> {
        if b.get(..2) != Some(b"MZ") {
            return Err(PeError::NotPe("no MZ signature"));
        }
        let pe = u32_at(b, 0x3c, "e_lfanew")? as usize;
        if b.get(pe..pe + 4) != Some(b"PE\0\0") {
            return Err(PeError::NotPe("no PE signature at e_lfanew"));
        }
        let coff = pe + 4;
        let nsections = u16_at(b, coff + 2, "the COFF header")? as usize;
        let opt_size = u16_at(b, coff + 16, "the COFF header")? as usize;
        let opt = coff + 20;
        let magic = u16_at(b, opt, "the optional header")?;
        let pe32_plus = match magic {
            0x20b => true,
            0x10b => false,
            _ => return Err(PeError::NotPe("unknown optional header magic")),
        };
        let image_base = if pe32_plus {
            u64_at(b, opt + 24, "the optional header")?
        } else {
            u64::from(u32_at(b, opt + 28, "the optional header")?)
        };
        let section_alignment = u32_at(b, opt + 32, "the optional header")?;
        let file_alignment = u32_at(b, opt + 36, "the optional header")?;
        let size_of_image = u32_at(b, opt + 56, "the optional header")?;
        let table = opt + opt_size;
        let mut sections = Vec::with_capacity(nsections);
        for i in 0..nsections {
            let at = table + 40 * i;
            let raw_name = b
                .get(at..at + 8)
                .ok_or(PeError::Truncated("the section table"))?;
            let name_len = raw_name.iter().position(|&c| c == 0).unwrap_or(8);
            sections.push(PeSection {
                name: String::from_utf8_lossy(&raw_name[..name_len]).into_owned(),
                virtual_size: u32_at(b, at + 8, "the section table")?,
                rva: u32_at(b, at + 12, "the section table")?,
                raw_size: u32_at(b, at + 16, "the section table")?,
                raw_offset: u32_at(b, at + 20, "the section table")?,
            });
        }
        Ok(PeHeaders {
            pe32_plus,
            image_base,
            section_alignment,
            file_alignment,
            size_of_image,
            sections,
        })
    }

    /// The section called `name`, if there is one.
    pub fn section(&self, name: &str) -> Option<&PeSection> {
        self.sections.iter().find(|s| s.name == name)
    }

    /// The first RVA after every section, aligned to SectionAlignment.
    pub fn next_free_rva(&self) -> u64 {
        let end = self.sections.iter().map(PeSection::end).max().unwrap_or(0);
        align_up(end, u64::from(self.section_alignment))
    }

    /// Refuse two sections whose memory ranges overlap.
    pub fn check_no_overlap(&self) -> Result<(), PeError> {
        for (i, s) in self.sections.iter().enumerate() {
            for o in &self.sections[i + 1..] {
                if u64::from(s.rva) < o.end() && u64::from(o.rva) < s.end() {
                    return Err(PeError::Overlap {
                        name: s.name.clone(),
                        rva: u64::from(s.rva),
                        len: s.end() - u64::from(s.rva),
                        other: o.name.clone(),
                    });
                }
            }
        }
        Ok(())
    }
}

/// RVAs for sections of the given lengths, placed one after the other after the stub's last
/// section, each aligned to `alignment`.
pub fn place(after: u64, alignment: u32, lens: &[u64]) -> Vec<u64> {
    let mut at = align_up(after, u64::from(alignment));
    lens.iter()
        .map(|&len| {
            let here = at;
            at = align_up(at + len, u64::from(alignment));
            here
        })
        .collect()
}

/// What goes into a UKI.
#[derive(Debug, Clone)]
pub struct UkiInputs {
    /// systemd's EFI stub ([`DEFAULT_STUB`]).
    pub stub: PathBuf,
    /// The kernel (bzImage).
    pub kernel: PathBuf,
    /// The initramfs.
    pub initramfs: PathBuf,
    /// The kernel command line (without a terminating NUL; one is added).
    pub cmdline: String,
    /// The os-release text of the boot stage.
    pub os_release: String,
}

fn read(p: &Path, what: &str) -> Result<Vec<u8>, ImageError> {
    std::fs::read(p).map_err(|e| ImageError::Io {
        what: format!("{what} {}", p.display()),
        source: e,
    })
}

fn pe_err(path: &Path) -> impl FnOnce(PeError) -> ImageError + '_ {
    move |e| ImageError::Pe {
        path: path.display().to_string(),
        source: e,
    }
}

/// Build the UKI at `out` (replaced if it exists) and check it: its section table parses, it
/// lists the four sections with exactly the bytes given, and no two sections overlap.
pub fn build(inputs: &UkiInputs, out: &Path, work: &Path) -> Result<PeHeaders, ImageError> {
    if !inputs.stub.is_file() {
        return Err(ImageError::MissingInput {
            what: "systemd's EFI stub (install systemd-boot-efi: apt-get install systemd-boot-efi)"
                .into(),
            path: inputs.stub.display().to_string(),
        });
    }
    let stub = read(&inputs.stub, "the EFI stub")?;
    let headers = PeHeaders::parse(&stub).map_err(pe_err(&inputs.stub))?;
    for name in SECTIONS {
        if headers.section(name).is_some() {
            return Err(ImageError::Pe {
                path: inputs.stub.display().to_string(),
                source: PeError::NotPe("the stub already has a UKI section; give the bare stub"),
            });
        }
    }
    let osrel = work.join("osrel");
    let cmdline = work.join("cmdline");
    let write = |p: &Path, b: &[u8]| {
        std::fs::write(p, b).map_err(|e| ImageError::Io {
            what: p.display().to_string(),
            source: e,
        })
    };
    write(&osrel, inputs.os_release.as_bytes())?;
    let mut c = inputs.cmdline.clone().into_bytes();
    c.push(0);
    write(&cmdline, &c)?;
    let files = [
        osrel.clone(),
        cmdline.clone(),
        inputs.kernel.clone(),
        inputs.initramfs.clone(),
    ];
    let mut contents = Vec::with_capacity(files.len());
    for f in &files {
        contents.push(read(f, "a UKI input")?);
    }
    let lens: Vec<u64> = contents.iter().map(|c| c.len() as u64).collect();
    let rvas = place(headers.next_free_rva(), headers.section_alignment, &lens);
    let mut cmd = Command::new("objcopy");
    for ((name, file), rva) in SECTIONS.iter().zip(&files).zip(&rvas) {
        cmd.arg("--add-section")
            .arg(format!("{name}={}", file.display()))
            .arg("--change-section-vma")
            .arg(format!("{name}={:#x}", headers.image_base + rva));
    }
    let _ = std::fs::remove_file(out);
    cmd.arg(&inputs.stub).arg(out);
    let o = cmd.output().map_err(|e| ImageError::Spawn {
        tool: "objcopy",
        source: e,
    })?;
    if !o.status.success() {
        return Err(ImageError::Tool {
            tool: "objcopy",
            status: o.status.to_string(),
            stderr: String::from_utf8_lossy(&o.stderr).trim().to_string(),
        });
    }
    let built = read(out, "the UKI")?;
    check(&built, &contents).map_err(pe_err(out))
}

/// Check a built UKI: its headers parse, the four sections hold exactly `contents` (in
/// [`SECTIONS`] order), and no two sections overlap.
pub fn check(uki: &[u8], contents: &[Vec<u8>]) -> Result<PeHeaders, PeError> {
    let h = PeHeaders::parse(uki)?;
    h.check_no_overlap()?;
    for (name, want) in SECTIONS.iter().zip(contents) {
        let s = h
            .section(name)
            .ok_or(PeError::NotPe("a UKI section is missing"))?;
        if s.data(uki)? != want.as_slice() || s.virtual_size as usize != want.len() {
            return Err(PeError::NotPe("a UKI section does not hold what was added"));
        }
    }
    Ok(h)
}

/// Check that `uki` is a UKI: its headers parse, it has the four sections, none overlap.
pub fn check_shape(uki: &[u8]) -> Result<PeHeaders, PeError> {
    let h = PeHeaders::parse(uki)?;
    h.check_no_overlap()?;
    for name in SECTIONS {
        let s = h
            .section(name)
            .ok_or(PeError::NotPe("a UKI section is missing"))?;
        s.data(uki)?;
    }
    Ok(h)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {

    /// A minimal PE32+ file: headers, 64 bytes of "code", then a 100-byte certificate table.
    fn signed_pe() -> (Vec<u8>, usize) {
        let mut b = vec![0u8; 0x40 + 4 + 20 + 240];
        b[..2].copy_from_slice(b"MZ");
        b[0x3c..0x40].copy_from_slice(&0x40u32.to_le_bytes());
        b[0x40..0x44].copy_from_slice(b"PE\0\0");
        let opt = 0x44 + 20;
        b[0x44 + 16..0x44 + 18].copy_from_slice(&240u16.to_le_bytes());
        b[opt..opt + 2].copy_from_slice(&0x20bu16.to_le_bytes());
        b[opt + 108..opt + 112].copy_from_slice(&16u32.to_le_bytes());
        b.extend_from_slice(&[0xC3; 64]);
        let unsigned_len = b.len();
        let entry = opt + 112 + 32;
        b[entry..entry + 4].copy_from_slice(&(unsigned_len as u32).to_le_bytes());
        b[entry + 4..entry + 8].copy_from_slice(&100u32.to_le_bytes());
        b.extend_from_slice(&[0x30; 100]);
        (b, unsigned_len)
    }

    #[test]
    fn stripping_the_signature_cuts_the_certificate_table_and_zeroes_its_entry() {
        let (signed, unsigned_len) = signed_pe();
        let out = strip_signature(&signed).unwrap();
        assert_eq!(out.len(), unsigned_len);
        let entry = 0x44 + 20 + 112 + 32;
        assert_eq!(&out[entry..entry + 8], &[0; 8]);
        assert_eq!(&out[..entry], &signed[..entry]);
        assert_eq!(&out[entry + 8..], &signed[entry + 8..unsigned_len]);
        // once stripped, there is nothing more to strip; other files are refused
        assert!(strip_signature(&out).is_err());
        assert!(strip_signature(b"not a pe").is_err());
        let mut short = signed.clone();
        short.pop();
        assert!(strip_signature(&short).is_err());
    }

    use super::*;

    fn stub() -> Vec<u8> {
        std::fs::read(DEFAULT_STUB).unwrap_or_else(|e| {
            panic!("{DEFAULT_STUB}: {e} (ci/install-deps installs systemd-boot-efi)")
        })
    }

    #[test]
    fn the_real_stub_parses() {
        let b = stub();
        let h = PeHeaders::parse(&b).unwrap();
        assert!(h.pe32_plus);
        assert!(h.section_alignment.is_power_of_two() && h.section_alignment >= 512);
        assert!(h.section(".text").is_some(), "{h:?}");
        for s in SECTIONS {
            assert!(h.section(s).is_none(), "the bare stub has {s}");
        }
        h.check_no_overlap().unwrap();
        let next = h.next_free_rva();
        assert_eq!(next % u64::from(h.section_alignment), 0);
        assert!(h.sections.iter().all(|s| s.end() <= next));
    }

    #[test]
    fn bad_headers_are_errors_not_panics() {
        assert!(PeHeaders::parse(b"").is_err());
        assert!(PeHeaders::parse(b"MZ").is_err());
        let mut b = stub();
        b.truncate(0x100);
        assert!(PeHeaders::parse(&b).is_err());
        let mut b = stub();
        b[0x3c] = 0xff;
        b[0x3d] = 0xff;
        assert!(PeHeaders::parse(&b).is_err());
    }

    #[test]
    fn placement_is_aligned_and_never_overlaps() {
        let r = place(0x1_2345, 0x1000, &[10, 0x1000, 0x1001, 5]);
        assert_eq!(r, vec![0x1_3000, 0x1_4000, 0x1_5000, 0x1_7000]);
    }

    #[test]
    fn a_built_uki_holds_the_four_sections_exactly() {
        let d = tempfile::tempdir().unwrap();
        let kernel = d.path().join("vmlinuz");
        let initrd = d.path().join("initrd");
        // stand-ins with recognisable, distinct bytes; the initramfs larger than the kernel
        let k: Vec<u8> = (0..300_001u32).map(|i| (i % 253) as u8).collect();
        let i: Vec<u8> = (0..2_000_003u32).map(|i| (i % 241) as u8 ^ 0x5a).collect();
        std::fs::write(&kernel, &k).unwrap();
        std::fs::write(&initrd, &i).unwrap();
        let out = d.path().join("uki.efi");
        let inputs = UkiInputs {
            stub: DEFAULT_STUB.into(),
            kernel,
            initramfs: initrd,
            cmdline: "console=ttyS0 panic=10".into(),
            os_release: crate::image::release::os_release("9.9.9"),
        };
        let work = tempfile::tempdir().unwrap();
        build(&inputs, &out, work.path()).unwrap();
        let b = std::fs::read(&out).unwrap();
        let h = PeHeaders::parse(&b).unwrap();
        h.check_no_overlap().unwrap();
        let want: [&[u8]; 4] = [
            inputs.os_release.as_bytes(),
            b"console=ttyS0 panic=10\0",
            &k,
            &i,
        ];
        let stub_end = PeHeaders::parse(&stub()).unwrap().next_free_rva();
        let mut prev_end = stub_end;
        for (name, want) in SECTIONS.iter().zip(want) {
            let s = h
                .section(name)
                .unwrap_or_else(|| panic!("{name} missing: {h:?}"));
            assert_eq!(s.data(&b).unwrap(), want, "{name}");
            assert_eq!(s.virtual_size as usize, want.len(), "{name}");
            assert_eq!(s.rva % h.section_alignment, 0, "{name}");
            assert!(
                u64::from(s.rva) >= prev_end,
                "{name} starts inside the previous section"
            );
            prev_end = s.end();
        }
        check_shape(&b).unwrap();
        assert!(check_shape(&stub()).is_err());
    }

    #[test]
    fn a_missing_stub_says_what_to_install() {
        let d = tempfile::tempdir().unwrap();
        let e = build(
            &UkiInputs {
                stub: d.path().join("nope.efi.stub"),
                kernel: d.path().join("k"),
                initramfs: d.path().join("i"),
                cmdline: String::new(),
                os_release: String::new(),
            },
            &d.path().join("out.efi"),
            d.path(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("install systemd-boot-efi"), "{e}");
    }
}
