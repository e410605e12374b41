//! Kernel modules for the initramfs: find the modules KeelOS needs in an extracted Debian
//! kernel package, add their dependencies (each module's modinfo `depends=`), order them so
//! every module comes after what it depends on, and write the manifest keel-init loads.
//!
//! [`order`] is pure; [`ModuleIndex`] reads the kernel tree it is pointed at and never writes.

use super::elf;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Where the manifest sits in the initramfs. One absolute module path per line, in load order;
/// `#` starts a comment. keel-init loads them in that order with finit_module.
pub const MANIFEST_PATH: &str = "/lib/modules/keel-modules.list";

/// A module set could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModuleError {
    #[error(
        "kernel module {name} (needed by {needed_by}) is neither a module of kernel {release} \
         nor built in; check the name in image/modules.list"
    )]
    Missing {
        name: String,
        needed_by: String,
        release: String,
    },
    #[error("kernel modules depend on each other in a cycle: {0}")]
    Cycle(String),
    #[error("cannot read {path}: {why}")]
    Read { path: String, why: String },
    #[error(
        "{path} is compressed; this build loads uncompressed modules only (Debian's {release} \
         ships them uncompressed: pin such a kernel in image/versions.env)"
    )]
    Compressed { path: String, release: String },
}

/// Module names are compared with '-' and '_' as the same character, as the kernel does.
pub fn canonical(name: &str) -> String {
    name.replace('-', "_")
}

/// What [`order`] knows about one module name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// A loadable module with these dependencies.
    Module(Vec<String>),
    /// Compiled into the kernel: nothing to load.
    BuiltIn,
    Missing,
}

/// The load order for `roots`: every module after its dependencies, otherwise in the order the
/// roots and each module's `depends=` list them. Built-in modules are left out.
pub fn order(
    roots: &[String],
    release: &str,
    mut lookup: impl FnMut(&str) -> Result<Lookup, ModuleError>,
) -> Result<Vec<String>, ModuleError> {
    #[derive(PartialEq)]
    enum Mark {
        Visiting,
        Done,
    }
    let mut marks: BTreeMap<String, Mark> = BTreeMap::new();
    let mut out = Vec::new();
    // Explicit stack of (module, needed_by, deps left to visit): no recursion on input depth.
    for root in roots {
        let root = canonical(root);
        if marks.contains_key(&root) {
            continue;
        }
        let mut stack: Vec<(String, Vec<String>)> = Vec::new();
        let mut chain: Vec<String> = Vec::new();
        let mut push = |name: String,
                        needed_by: String,
                        stack: &mut Vec<(String, Vec<String>)>,
                        chain: &mut Vec<String>,
                        marks: &mut BTreeMap<String, Mark>|
         -> Result<(), ModuleError> {
            match marks.get(&name) {
                Some(Mark::Done) => return Ok(()),
                Some(Mark::Visiting) => {
                    chain.push(name);
                    return Err(ModuleError::Cycle(chain.join(" -> ")));
                }
                None => {}
            }
            match lookup(&name)? {
                Lookup::BuiltIn => {
                    marks.insert(name, Mark::Done);
                }
                Lookup::Missing => {
                    return Err(ModuleError::Missing {
                        name,
                        needed_by,
                        release: release.to_string(),
                    })
                }
                Lookup::Module(deps) => {
                    let mut deps: Vec<String> = deps.iter().map(|d| canonical(d)).collect();
                    deps.reverse(); // popped from the end: visit in listed order
                    marks.insert(name.clone(), Mark::Visiting);
                    chain.push(name.clone());
                    stack.push((name, deps));
                }
            }
            Ok(())
        };
        push(
            root,
            "image/modules.list".to_string(),
            &mut stack,
            &mut chain,
            &mut marks,
        )?;
        while let Some((name, deps)) = stack.last_mut() {
            match deps.pop() {
                Some(dep) => {
                    let by = name.clone();
                    push(dep, by, &mut stack, &mut chain, &mut marks)?;
                }
                None => {
                    let name = name.clone();
                    stack.pop();
                    chain.pop();
                    marks.insert(name.clone(), Mark::Done);
                    out.push(name);
                }
            }
        }
    }
    Ok(out)
}

/// The `depends=` of a module file's bytes.
pub fn depends_of(ko: &[u8]) -> Result<Vec<String>, elf::ElfError> {
    Ok(elf::modinfo(ko)?
        .into_iter()
        .filter(|(k, _)| k == "depends")
        .flat_map(|(_, v)| {
            v.split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect())
}

/// The modules of one kernel release, found in `<root>/lib/modules/<release>`.
#[derive(Debug, Clone)]
pub struct ModuleIndex {
    pub release: String,
    /// `<root>/lib/modules/<release>`
    pub dir: PathBuf,
    /// canonical name -> path relative to `dir`
    modules: BTreeMap<String, PathBuf>,
    builtin: BTreeSet<String>,
}

/// One module to load: its name and where it lives under `lib/modules/<release>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleFile {
    pub name: String,
    pub rel: PathBuf,
}

fn read_err(p: &Path, e: impl std::fmt::Display) -> ModuleError {
    ModuleError::Read {
        path: p.display().to_string(),
        why: e.to_string(),
    }
}

impl ModuleIndex {
    /// Index every module file under `<root>/lib/modules/<release>` (and modules.builtin).
    pub fn open(root: &Path, release: &str) -> Result<Self, ModuleError> {
        let dir = root.join("lib/modules").join(release);
        let mut modules = BTreeMap::new();
        let mut todo = vec![dir.clone()];
        while let Some(d) = todo.pop() {
            for ent in std::fs::read_dir(&d).map_err(|e| read_err(&d, e))? {
                let ent = ent.map_err(|e| read_err(&d, e))?;
                let p = ent.path();
                let ft = ent.file_type().map_err(|e| read_err(&p, e))?;
                if ft.is_dir() {
                    todo.push(p);
                    continue;
                }
                let fname = ent.file_name().to_string_lossy().into_owned();
                let stem = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
                    .iter()
                    .find_map(|suf| fname.strip_suffix(suf));
                if let Some(stem) = stem {
                    let rel = p.strip_prefix(&dir).map_err(|e| read_err(&p, e))?;
                    modules.insert(canonical(stem), rel.to_path_buf());
                }
            }
        }
        let builtin_file = dir.join("modules.builtin");
        let builtin = match std::fs::read_to_string(&builtin_file) {
            Ok(s) => s
                .lines()
                .filter_map(|l| l.rsplit('/').next())
                .filter_map(|f| f.strip_suffix(".ko"))
                .map(canonical)
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeSet::new(),
            Err(e) => return Err(read_err(&builtin_file, e)),
        };
        Ok(ModuleIndex {
            release: release.to_string(),
            dir,
            modules,
            builtin,
        })
    }

    /// The modules to load for `roots`, dependencies first.
    pub fn resolve(&self, roots: &[String]) -> Result<Vec<ModuleFile>, ModuleError> {
        let names = order(roots, &self.release, |name| {
            if let Some(rel) = self.modules.get(name) {
                let p = self.dir.join(rel);
                if rel.extension().is_some_and(|e| e != "ko") {
                    return Err(ModuleError::Compressed {
                        path: p.display().to_string(),
                        release: self.release.clone(),
                    });
                }
                let bytes = std::fs::read(&p).map_err(|e| read_err(&p, e))?;
                let deps = depends_of(&bytes).map_err(|e| read_err(&p, e))?;
                Ok(Lookup::Module(deps))
            } else if self.builtin.contains(name) {
                Ok(Lookup::BuiltIn)
            } else {
                Ok(Lookup::Missing)
            }
        })?;
        Ok(names
            .into_iter()
            .filter_map(|n| {
                self.modules.get(&n).map(|rel| ModuleFile {
                    name: n.clone(),
                    rel: rel.clone(),
                })
            })
            .collect())
    }
}

/// The manifest's text for modules installed under `/lib/modules/<release>/`.
pub fn manifest(release: &str, mods: &[ModuleFile]) -> String {
    let mut s = String::from(
        "# Kernel modules keel-init loads at boot, in this order (written by keel-image build).\n",
    );
    for m in mods {
        s.push_str(&format!("/lib/modules/{release}/{}\n", m.rel.display()));
    }
    s
}

/// Read a module list file: one name per line, `#` comments and blank lines ignored.
pub fn parse_list(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// What the kernel's `sign-file` appends after a module's signature.
const MODULE_SIG_MAGIC: &[u8] = b"~Module signature appended~\n";

/// `b` (a signed kernel module, as Debian ships them) without its appended signature: the
/// signature, the 12-byte `struct module_signature` that sizes it and the marker cut off, the
/// ELF object before them byte for byte the same. A kernel that enforces module signatures
/// (lockdown=integrity does) refuses what is left; one that does not loads it.
pub fn strip_module_signature(b: &[u8]) -> Result<Vec<u8>, String> {
    let body = b
        .strip_suffix(MODULE_SIG_MAGIC)
        .ok_or("the module carries no appended signature")?;
    let info_at = body
        .len()
        .checked_sub(12)
        .ok_or("the module is shorter than its signature information")?;
    let info = &body[info_at..];
    // signer_len, key_id_len (bytes 3 and 4) and the big-endian sig_len (bytes 8..12)
    let sig_len = u32::from_be_bytes([info[8], info[9], info[10], info[11]]) as usize;
    let cut = sig_len + usize::from(info[3]) + usize::from(info[4]);
    let end = info_at
        .checked_sub(cut)
        .ok_or("the module's signature is longer than the module")?;
    if b.get(..4) != Some(b"\x7fELF") || end < 4 {
        return Err("not an ELF kernel module".into());
    }
    Ok(b[..end].to_vec())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn a_module_signature_is_cut_off_and_only_it() {
        let object = b"\x7fELF the module's object code".to_vec();
        let sig = vec![0x30u8; 700];
        let mut signed = object.clone();
        signed.extend_from_slice(&sig);
        // PKCS#7: algo, hash, id_type = 2, signer_len = key_id_len = 0, pad, sig_len
        signed.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0]);
        signed.extend_from_slice(&(sig.len() as u32).to_be_bytes());
        signed.extend_from_slice(MODULE_SIG_MAGIC);
        assert_eq!(strip_module_signature(&signed).unwrap(), object);
        assert_eq!(
            strip_module_signature(&object).unwrap_err(),
            "the module carries no appended signature"
        );
        let mut lying = object.clone();
        lying.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0]);
        lying.extend_from_slice(&100_000u32.to_be_bytes());
        lying.extend_from_slice(MODULE_SIG_MAGIC);
        assert!(strip_module_signature(&lying)
            .unwrap_err()
            .contains("longer than the module"));
        assert!(strip_module_signature(MODULE_SIG_MAGIC).is_err());
    }

    fn table<'a>(
        t: &'a [(&'a str, &'a [&'a str])],
    ) -> impl FnMut(&str) -> Result<Lookup, ModuleError> + 'a {
        move |name| {
            if name == "builtin_one" {
                return Ok(Lookup::BuiltIn);
            }
            Ok(t.iter()
                .find(|(n, _)| *n == name)
                .map_or(Lookup::Missing, |(_, d)| {
                    Lookup::Module(d.iter().map(|s| s.to_string()).collect())
                }))
        }
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn dependencies_come_first_and_once() {
        let t: &[(&str, &[&str])] = &[
            ("virtio_blk", &["virtio", "virtio_ring"]),
            ("virtio_net", &["virtio_ring", "virtio", "net_failover"]),
            ("net_failover", &["failover"]),
            ("failover", &[]),
            ("virtio", &[]),
            ("virtio_ring", &[]),
            ("ext4", &["jbd2", "mbcache", "crc16", "builtin_one"]),
            ("jbd2", &[]),
            ("mbcache", &[]),
            ("crc16", &[]),
        ];
        let got = order(&s(&["virtio-blk", "virtio_net", "ext4"]), "r", table(t)).unwrap();
        assert_eq!(
            got,
            s(&[
                "virtio",
                "virtio_ring",
                "virtio_blk",
                "failover",
                "net_failover",
                "virtio_net",
                "jbd2",
                "mbcache",
                "crc16",
                "ext4"
            ])
        );
        for (i, m) in got.iter().enumerate() {
            let deps = t.iter().find(|(n, _)| n == m).unwrap().1;
            for d in deps.iter().filter(|d| **d != "builtin_one") {
                let j = got.iter().position(|x| x == d).unwrap();
                assert!(j < i, "{d} must load before {m}");
            }
        }
    }

    #[test]
    fn missing_and_cycles_are_clear_errors() {
        let t: &[(&str, &[&str])] = &[("a", &["b"]), ("b", &["c"]), ("c", &["a"])];
        match order(&s(&["a"]), "r", table(t)) {
            Err(ModuleError::Cycle(c)) => assert_eq!(c, "a -> b -> c -> a"),
            other => panic!("{other:?}"),
        }
        let t: &[(&str, &[&str])] = &[("a", &["nope"])];
        let e = order(&s(&["a"]), "6.1", table(t)).unwrap_err();
        assert_eq!(
            e,
            ModuleError::Missing {
                name: "nope".into(),
                needed_by: "a".into(),
                release: "6.1".into()
            }
        );
        assert!(e.to_string().contains("image/modules.list"));
        assert_eq!(order(&s(&["builtin_one"]), "r", table(t)).unwrap(), s(&[]));
    }

    /// A relocatable ELF holding only a `.modinfo` section, like a .ko file's.
    fn fake_ko(modinfo: &[u8]) -> Vec<u8> {
        let shstr = b"\0.shstrtab\0.modinfo\0";
        let mut f = vec![0u8; 64];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        f[6] = 1;
        let modinfo_off = f.len() as u64;
        f.extend_from_slice(modinfo);
        let shstr_off = f.len() as u64;
        f.extend_from_slice(shstr);
        let shoff = f.len() as u64;
        let mut sh = |name: u32, off: u64, size: u64| {
            let mut h = vec![0u8; 64];
            h[0..4].copy_from_slice(&name.to_le_bytes());
            h[24..32].copy_from_slice(&off.to_le_bytes());
            h[32..40].copy_from_slice(&size.to_le_bytes());
            f.extend_from_slice(&h);
        };
        sh(0, 0, 0);
        sh(1, shstr_off, shstr.len() as u64);
        sh(11, modinfo_off, modinfo.len() as u64);
        f[0x28..0x30].copy_from_slice(&shoff.to_le_bytes());
        f[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        f[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        f[0x3e..0x40].copy_from_slice(&1u16.to_le_bytes());
        f
    }

    #[test]
    fn depends_is_read_from_modinfo() {
        let ko = fake_ko(b"license=GPL\0depends=virtio,virtio_ring\0intree=Y\0name=virtio_blk\0");
        assert_eq!(depends_of(&ko).unwrap(), s(&["virtio", "virtio_ring"]));
        let ko = fake_ko(b"depends=\0name=virtio\0");
        assert_eq!(depends_of(&ko).unwrap(), s(&[]));
        assert!(depends_of(b"not elf").is_err());
    }

    #[test]
    fn index_resolves_a_tree_and_writes_the_manifest() {
        let d = tempfile::tempdir().unwrap();
        let m = d.path().join("lib/modules/9.9-test");
        std::fs::create_dir_all(m.join("kernel/fs")).unwrap();
        std::fs::write(
            m.join("kernel/fs/ext4.ko"),
            fake_ko(b"depends=jbd2,crc16\0"),
        )
        .unwrap();
        std::fs::write(m.join("kernel/fs/jbd2.ko"), fake_ko(b"depends=\0")).unwrap();
        std::fs::write(m.join("modules.builtin"), "kernel/lib/crc16.ko\n").unwrap();
        let idx = ModuleIndex::open(d.path(), "9.9-test").unwrap();
        let mods = idx.resolve(&s(&["ext4"])).unwrap();
        assert_eq!(
            manifest("9.9-test", &mods)
                .lines()
                .skip(1)
                .collect::<Vec<_>>(),
            [
                "/lib/modules/9.9-test/kernel/fs/jbd2.ko",
                "/lib/modules/9.9-test/kernel/fs/ext4.ko"
            ]
        );
        std::fs::write(m.join("kernel/fs/zz.ko.xz"), b"xz").unwrap();
        assert!(matches!(
            idx.resolve(&s(&["zz"])),
            Err(ModuleError::Missing { .. })
        ));
        let idx = ModuleIndex::open(d.path(), "9.9-test").unwrap();
        assert!(matches!(
            idx.resolve(&s(&["zz"])),
            Err(ModuleError::Compressed { .. })
        ));
    }

    #[test]
    fn list_parsing_skips_comments() {
        assert_eq!(
            parse_list("# x\nvirtio_blk\n\n  ext4  # fs\n"),
            s(&["virtio_blk", "ext4"])
        );
    }
}
