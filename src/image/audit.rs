//! The audit every image passes before it is written: no shell, no interpreter, no script, no
//! user database, and every program's loader and libraries present.
//!
//! Reads the tree (and the host files it points at); never changes anything.

use super::elf;
use super::tree::{Node, Tree, TreeError};

/// Program names that are shells.
const SHELLS: &[&str] = &[
    "sh", "bash", "rbash", "dash", "ash", "zsh", "ksh", "mksh", "pdksh", "csh", "tcsh", "fish",
    "busybox", "toybox", "yash", "elvish", "nu", "xonsh",
];
/// Name prefixes of interpreters (python3.11, perl5.36, ...).
const INTERPRETER_PREFIXES: &[&str] = &[
    "python",
    "perl",
    "ruby",
    "lua",
    "php",
    "tclsh",
    "wish",
    "guile",
    "node",
    "nodejs",
    "deno",
    "bun",
    "irb",
    "jshell",
    "pwsh",
    "osascript",
    "expect",
    "gawk",
    "mawk",
    "nawk",
];
/// Exact names of interpreters that a prefix would over-match.
const INTERPRETERS: &[&str] = &["awk", "bc", "dc", "sed", "ed", "vi", "vim", "nano", "env"];
/// Libraries that embed an interpreter.
const INTERPRETER_LIBS: &[&str] = &["libpython", "libperl", "libruby", "liblua", "libtcl"];
/// Files that must not exist: no users, no passwords, no login.
const FORBIDDEN_PATHS: &[&str] = &[
    "etc/passwd",
    "etc/shadow",
    "etc/group",
    "etc/gshadow",
    "etc/sudoers",
    "etc/login.defs",
];

/// The audit found problems; nothing is written.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("image audit failed ({} findings):\n  {}", .0.len(), .0.join("\n  "))]
    Findings(Vec<String>),
    #[error(transparent)]
    Tree(#[from] TreeError),
}

fn forbidden_name(base: &str) -> Option<&'static str> {
    if SHELLS.contains(&base) {
        return Some("a shell");
    }
    if INTERPRETERS.contains(&base) {
        return Some("an interpreter");
    }
    if INTERPRETER_PREFIXES.iter().any(|p| {
        base.strip_prefix(p).is_some_and(|rest| {
            rest.is_empty()
                || rest.starts_with(|c: char| c.is_ascii_digit() || c == '.' || c == '-')
        })
    }) {
        return Some("an interpreter");
    }
    if INTERPRETER_LIBS.iter().any(|p| base.starts_with(p)) {
        return Some("a library embedding an interpreter");
    }
    None
}

/// Check `tree`. Every finding is reported at once.
pub fn audit(tree: &Tree) -> Result<(), AuditError> {
    let mut findings = Vec::new();
    for (path, node) in tree.entries() {
        let base = path.rsplit('/').next().unwrap_or(path);
        if FORBIDDEN_PATHS.contains(&path) {
            findings.push(format!(
                "/{path}: user databases are not allowed (no users, no login)"
            ));
        }
        if !matches!(node, Node::Dir) {
            if let Some(what) = forbidden_name(base) {
                findings.push(format!("/{path}: {what} is not allowed in a KeelOS image"));
            }
        }
        if let Node::Symlink(t) = node {
            let tb = t.rsplit('/').next().unwrap_or(t);
            if let Some(what) = forbidden_name(tb) {
                findings.push(format!("/{path} -> {t}: points at {what}"));
            }
        }
        let Node::File { content, .. } = node else {
            continue;
        };
        let data = tree.read(path, content)?;
        if data.starts_with(b"#!") {
            let line = data.split(|&b| b == b'\n').next().unwrap_or(&[]);
            findings.push(format!(
                "/{path}: a script ({}) needs an interpreter; KeelOS images have none",
                String::from_utf8_lossy(&line[..line.len().min(60)])
            ));
            continue;
        }
        if !elf::is_elf(&data) {
            continue;
        }
        match elf::dynamic(&data) {
            Err(e) => findings.push(format!("/{path}: unreadable ELF: {e}")),
            Ok(d) => {
                if let Some(i) = &d.interpreter {
                    if !resolves(tree, i) {
                        findings.push(format!("/{path}: its loader {i} is not in the image"));
                    }
                }
                for lib in &d.needed {
                    if !LIB_DIRS
                        .iter()
                        .any(|dir| resolves(tree, &format!("{dir}/{lib}")))
                    {
                        findings.push(format!(
                            "/{path}: needs {lib}, which is not in the image's library directories"
                        ));
                    }
                }
            }
        }
    }
    if findings.is_empty() {
        Ok(())
    } else {
        Err(AuditError::Findings(findings))
    }
}

/// The directories the dynamic loader searches in a KeelOS image (Debian's multiarch defaults).
pub const LIB_DIRS: &[&str] = &[
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib64",
    "/lib",
    "/usr/lib",
];

/// Whether `path` names a file in the tree, following symlinks (a bounded number of them).
pub fn resolves(tree: &Tree, path: &str) -> bool {
    let mut p = path.to_string();
    for _ in 0..16 {
        match tree.get(&p) {
            Some(Node::File { .. }) => return true,
            Some(Node::Symlink(t)) => {
                p = if t.starts_with('/') {
                    t.clone()
                } else {
                    let parent = p.rsplit_once('/').map_or("", |(a, _)| a);
                    format!("{parent}/{t}")
                };
                // fold "a/../b" produced by relative links
                let mut parts: Vec<&str> = Vec::new();
                for c in p.split('/') {
                    match c {
                        "" | "." => {}
                        ".." => {
                            parts.pop();
                        }
                        c => parts.push(c),
                    }
                }
                p = format!("/{}", parts.join("/"));
            }
            _ => return false,
        }
    }
    false
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::image::stub::{self, Stub};

    fn findings(t: &Tree) -> Vec<String> {
        match audit(t) {
            Ok(()) => Vec::new(),
            Err(AuditError::Findings(f)) => f,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn a_clean_tree_passes() {
        let mut t = Tree::new();
        t.bytes("/sbin/keel-init", stub::elf(&Stub::Exit(0)), 0o755)
            .unwrap();
        t.bytes("/etc/os-release", b"ID=keelos\n".to_vec(), 0o644)
            .unwrap();
        t.bytes("/usr/share/shells.txt", b"not a shell".to_vec(), 0o644)
            .unwrap();
        t.dir("/usr/lib/python-notes").unwrap();
        assert_eq!(findings(&t), Vec::<String>::new());
    }

    #[test]
    fn shells_interpreters_scripts_and_passwd_fail() {
        let elf = stub::elf(&Stub::Exit(0));
        for (path, what) in [
            ("/bin/sh", "a shell"),
            ("/usr/bin/bash", "a shell"),
            ("/bin/busybox", "a shell"),
            ("/usr/bin/dash", "a shell"),
            ("/usr/bin/python3", "an interpreter"),
            ("/usr/bin/python3.11", "an interpreter"),
            ("/usr/bin/perl5.36.0", "an interpreter"),
            ("/usr/bin/perl", "an interpreter"),
            ("/usr/bin/awk", "an interpreter"),
            ("/usr/lib/libpython3.11.so.1.0", "a library"),
            ("/etc/passwd", "user databases"),
        ] {
            let mut t = Tree::new();
            t.bytes(path, elf.clone(), 0o755).unwrap();
            let f = findings(&t);
            assert!(
                f.iter().any(|x| x.starts_with(path) && x.contains(what)),
                "{path}: {f:?}"
            );
        }
        let mut t = Tree::new();
        t.symlink("/usr/bin/x", "/usr/bin/zsh").unwrap();
        t.bytes("/usr/bin/run", b"#!/usr/bin/env foo\n".to_vec(), 0o755)
            .unwrap();
        let f = findings(&t);
        assert_eq!(f.len(), 2, "{f:?}");
        assert!(f.iter().any(|x| x.contains("a script")), "{f:?}");
        assert!(f.iter().any(|x| x.contains("points at a shell")), "{f:?}");
        // names that only start like an interpreter are fine
        let mut t = Tree::new();
        t.bytes("/usr/bin/perlite-config", b"x".to_vec(), 0o644)
            .unwrap();
        t.bytes("/usr/bin/shim", b"x".to_vec(), 0o644).unwrap();
        assert_eq!(findings(&t), Vec::<String>::new());
    }

    #[test]
    fn a_program_without_its_libraries_fails() {
        let host = std::env::current_exe().unwrap();
        let mut t = Tree::new();
        t.host_file("/usr/bin/prog", &host, 0o755).unwrap();
        let f = findings(&t);
        assert!(f.iter().any(|x| x.contains("loader")), "{f:?}");
        assert!(f.iter().any(|x| x.contains("libc.so.6")), "{f:?}");
    }

    #[test]
    fn symlinks_resolve() {
        let mut t = Tree::new();
        t.bytes("/usr/lib/x86_64-linux-gnu/libc.so.6", b"x".to_vec(), 0o644)
            .unwrap();
        t.symlink("/lib64/ld.so", "../usr/lib/x86_64-linux-gnu/libc.so.6")
            .unwrap();
        assert!(resolves(&t, "/lib64/ld.so"));
        t.symlink("/loop", "/loop").unwrap();
        assert!(!resolves(&t, "/loop"));
        assert!(!resolves(&t, "/nothing"));
    }
}
