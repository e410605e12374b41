//! Just enough ELF64 reading for the image build: a program's interpreter and the shared
//! libraries it needs (to copy them into the image), and a kernel module's `.modinfo` strings
//! (its `depends=`).
//!
//! Pure: it parses bytes it is given and never reads files itself. Every offset is bounds
//! checked, so a truncated or hostile file is an error, never a panic.

/// An ELF file could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ElfError {
    #[error("not an ELF file (no \\x7fELF magic)")]
    NotElf,
    #[error("unsupported ELF: {0} (the image build reads 64-bit little-endian ELF only)")]
    Unsupported(&'static str),
    #[error("truncated or malformed ELF: {0} lies outside the file")]
    Malformed(&'static str),
}

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;

/// Whether `data` starts like an ELF file.
pub fn is_elf(data: &[u8]) -> bool {
    data.starts_with(b"\x7fELF")
}

fn slice<'a>(d: &'a [u8], off: u64, len: u64, what: &'static str) -> Result<&'a [u8], ElfError> {
    let start = usize::try_from(off).map_err(|_| ElfError::Malformed(what))?;
    let len = usize::try_from(len).map_err(|_| ElfError::Malformed(what))?;
    let end = start.checked_add(len).ok_or(ElfError::Malformed(what))?;
    d.get(start..end).ok_or(ElfError::Malformed(what))
}

fn u16_at(d: &[u8], off: u64, what: &'static str) -> Result<u16, ElfError> {
    let b = slice(d, off, 2, what)?;
    Ok(u16::from_le_bytes([b[0], b[1]]))
}

fn u32_at(d: &[u8], off: u64, what: &'static str) -> Result<u32, ElfError> {
    let b = slice(d, off, 4, what)?;
    Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn u64_at(d: &[u8], off: u64, what: &'static str) -> Result<u64, ElfError> {
    let b = slice(d, off, 8, what)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    Ok(u64::from_le_bytes(a))
}

/// A NUL-terminated string starting at `off`.
fn cstr(d: &[u8], off: u64, what: &'static str) -> Result<String, ElfError> {
    let start = usize::try_from(off).map_err(|_| ElfError::Malformed(what))?;
    let rest = d.get(start..).ok_or(ElfError::Malformed(what))?;
    let end = rest
        .iter()
        .position(|&b| b == 0)
        .ok_or(ElfError::Malformed(what))?;
    Ok(String::from_utf8_lossy(&rest[..end]).into_owned())
}

fn check_header(d: &[u8]) -> Result<(), ElfError> {
    if !is_elf(d) {
        return Err(ElfError::NotElf);
    }
    match (d.get(4), d.get(5)) {
        (Some(2), Some(1)) => Ok(()),
        (Some(2), Some(_)) => Err(ElfError::Unsupported("big-endian")),
        (Some(_), _) => Err(ElfError::Unsupported("32-bit")),
        _ => Err(ElfError::Malformed("the identification bytes")),
    }
}

#[derive(Debug, Clone, Copy)]
struct Phdr {
    kind: u32,
    offset: u64,
    vaddr: u64,
    filesz: u64,
}

fn program_headers(d: &[u8]) -> Result<Vec<Phdr>, ElfError> {
    let phoff = u64_at(d, 0x20, "the header")?;
    let phentsize = u64::from(u16_at(d, 0x36, "the header")?);
    let phnum = u64::from(u16_at(d, 0x38, "the header")?);
    if phnum > 0 && phentsize < 56 {
        return Err(ElfError::Malformed("a program header"));
    }
    (0..phnum)
        .map(|i| {
            let at = phoff
                .checked_add(i * phentsize)
                .ok_or(ElfError::Malformed("a program header"))?;
            let what = "a program header";
            Ok(Phdr {
                kind: u32_at(d, at, what)?,
                offset: u64_at(d, at + 8, what)?,
                vaddr: u64_at(d, at + 16, what)?,
                filesz: u64_at(d, at + 32, what)?,
            })
        })
        .collect()
}

/// What a program needs from the dynamic loader.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Dynamic {
    /// PT_INTERP: the loader's absolute path; `None` for a static program or a library.
    pub interpreter: Option<String>,
    /// DT_NEEDED, in file order.
    pub needed: Vec<String>,
}

/// Read the interpreter and DT_NEEDED entries of an executable or shared library.
pub fn dynamic(d: &[u8]) -> Result<Dynamic, ElfError> {
    check_header(d)?;
    let phdrs = program_headers(d)?;
    let mut out = Dynamic::default();
    if let Some(p) = phdrs.iter().find(|p| p.kind == PT_INTERP) {
        let raw = slice(d, p.offset, p.filesz, "the interpreter path")?;
        let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
        out.interpreter = Some(String::from_utf8_lossy(&raw[..end]).into_owned());
    }
    let Some(dynseg) = phdrs.iter().find(|p| p.kind == PT_DYNAMIC) else {
        return Ok(out);
    };
    let mut strtab_vaddr = None;
    let mut needed_offsets = Vec::new();
    let count = dynseg.filesz / 16;
    for i in 0..count {
        let at = dynseg.offset + i * 16;
        let tag = u64_at(d, at, "the dynamic section")?;
        let val = u64_at(d, at + 8, "the dynamic section")?;
        match tag {
            DT_NULL => break,
            DT_NEEDED => needed_offsets.push(val),
            DT_STRTAB => strtab_vaddr = Some(val),
            _ => {}
        }
    }
    if needed_offsets.is_empty() {
        return Ok(out);
    }
    let strtab_vaddr = strtab_vaddr.ok_or(ElfError::Malformed("DT_STRTAB"))?;
    // DT_STRTAB is an address: find the loaded segment that holds it to get a file offset.
    let seg = phdrs
        .iter()
        .find(|p| {
            p.kind == PT_LOAD && strtab_vaddr >= p.vaddr && strtab_vaddr - p.vaddr < p.filesz.max(1)
        })
        .ok_or(ElfError::Malformed("DT_STRTAB's address"))?;
    let strtab = seg.offset + (strtab_vaddr - seg.vaddr);
    for off in needed_offsets {
        let at = strtab
            .checked_add(off)
            .ok_or(ElfError::Malformed("a DT_NEEDED name"))?;
        out.needed.push(cstr(d, at, "a DT_NEEDED name")?);
    }
    Ok(out)
}

/// The contents of the section called `name`, if the file has one.
pub fn section<'a>(d: &'a [u8], name: &str) -> Result<Option<&'a [u8]>, ElfError> {
    check_header(d)?;
    let shoff = u64_at(d, 0x28, "the header")?;
    let shentsize = u64::from(u16_at(d, 0x3a, "the header")?);
    let shnum = u64::from(u16_at(d, 0x3c, "the header")?);
    let shstrndx = u64::from(u16_at(d, 0x3e, "the header")?);
    if shnum == 0 {
        return Ok(None);
    }
    if shentsize < 64 || shstrndx >= shnum {
        return Err(ElfError::Malformed("the section headers"));
    }
    let sh = |i: u64| -> Result<(u32, u64, u64), ElfError> {
        let at = shoff
            .checked_add(i * shentsize)
            .ok_or(ElfError::Malformed("a section header"))?;
        let what = "a section header";
        Ok((
            u32_at(d, at, what)?,
            u64_at(d, at + 24, what)?,
            u64_at(d, at + 32, what)?,
        ))
    };
    let (_, names_off, _) = sh(shstrndx)?;
    for i in 0..shnum {
        let (name_idx, off, size) = sh(i)?;
        let at = names_off
            .checked_add(u64::from(name_idx))
            .ok_or(ElfError::Malformed("a section name"))?;
        if cstr(d, at, "a section name")? == name {
            return Ok(Some(slice(d, off, size, "a section's contents")?));
        }
    }
    Ok(None)
}

/// The `key=value` strings of a kernel module's `.modinfo` section, in file order.
pub fn modinfo(d: &[u8]) -> Result<Vec<(String, String)>, ElfError> {
    let Some(sec) = section(d, ".modinfo")? else {
        return Ok(Vec::new());
    };
    Ok(sec
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .filter_map(|s| {
            let s = String::from_utf8_lossy(s);
            s.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    fn host_binary() -> Vec<u8> {
        // Any dynamically linked program of the host: the test runner itself is one.
        std::fs::read(std::env::current_exe().unwrap()).unwrap()
    }

    #[test]
    fn reads_the_interpreter_and_libc_of_a_host_program() {
        let d = dynamic(&host_binary()).unwrap();
        let interp = d
            .interpreter
            .expect("the test binary is dynamically linked");
        assert!(
            interp.starts_with('/') && interp.contains("ld-linux"),
            "{interp}"
        );
        assert!(d.needed.iter().any(|n| n == "libc.so.6"), "{:?}", d.needed);
    }

    #[test]
    fn a_shared_library_has_needed_but_no_interpreter() {
        // (libc.so.6 itself is also a program and has an interpreter; libm is only a library)
        let libm = std::fs::read("/lib/x86_64-linux-gnu/libm.so.6").unwrap();
        let d = dynamic(&libm).unwrap();
        assert_eq!(d.interpreter, None);
        assert!(d.needed.iter().any(|n| n == "libc.so.6"), "{d:?}");
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        assert_eq!(dynamic(b"#!/bin/sh\n"), Err(ElfError::NotElf));
        assert_eq!(dynamic(b""), Err(ElfError::NotElf));
        let full = host_binary();
        // every truncation of the header region and a few beyond must fail cleanly or parse
        for len in (0..200).chain([1000, 4096, 10_000]) {
            let _ = dynamic(&full[..len.min(full.len())]);
            let _ = section(&full[..len.min(full.len())], ".modinfo");
        }
        let mut bad = full[..64].to_vec();
        bad[4] = 1;
        assert_eq!(dynamic(&bad), Err(ElfError::Unsupported("32-bit")));
        // a program header table pointing far outside the file
        let mut far = full[..4096.min(full.len())].to_vec();
        far[0x20..0x28].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(dynamic(&far), Err(ElfError::Malformed(_))));
    }

    #[test]
    fn no_modinfo_in_a_program() {
        assert_eq!(modinfo(&host_binary()).unwrap(), Vec::new());
    }
}
