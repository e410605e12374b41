//! Stage 2 writes what [`crate::kube::files`] generates, under a root (`/` on a node, a temporary
//! directory in tests), before any service starts. Each file is replaced atomically (a
//! temporary file beside it, renamed over it) so that a kubelet or containerd that reads one
//! never sees half of it; the static pod directory is emptied of pods the configuration no
//! longer has.

use crate::kube::{self, NodeFile};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Writing a file for kubelet failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot {op} {path} for kubelet: {source}")]
pub struct KubeFileError {
    pub op: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

fn under(root: &Path, abs: &Path) -> PathBuf {
    root.join(abs.strip_prefix("/").unwrap_or(abs))
}

fn write_one(root: &Path, f: &NodeFile) -> Result<(), KubeFileError> {
    let path = under(root, &f.path);
    let err = |op, p: &Path| {
        let p = p.to_path_buf();
        move |source| KubeFileError {
            op,
            path: p,
            source,
        }
    };
    let dir = path.parent().unwrap_or(root);
    fs::create_dir_all(dir).map_err(err("create the directory of", &path))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let _ = fs::remove_file(&tmp);
    let mut out = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(f.mode)
        .open(&tmp)
        .map_err(err("create", &tmp))?;
    out.write_all(&f.contents).map_err(err("write", &tmp))?;
    // the mode given at creation is filtered by the umask
    out.set_permissions(fs::Permissions::from_mode(f.mode))
        .map_err(err("set the mode of", &tmp))?;
    out.sync_all().map_err(err("fsync", &tmp))?;
    drop(out);
    fs::rename(&tmp, &path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        err("rename", &path)(e)
    })
}

/// Write `files` under `root`, after removing from the static pod directory every `*.json`
/// that is not among them. Returns what was written; stops at the first failure.
pub fn write(root: &Path, files: &[NodeFile]) -> Result<Vec<PathBuf>, KubeFileError> {
    let pods = under(root, Path::new(kube::STATIC_POD_DIR));
    if let Ok(rd) = fs::read_dir(&pods) {
        for e in rd.flatten() {
            let p = e.path();
            let keep = files.iter().any(|f| under(root, &f.path) == p);
            if !keep && p.extension().is_some_and(|x| x == "json") {
                fs::remove_file(&p).map_err(|source| KubeFileError {
                    op: "remove the stale static pod",
                    path: p.clone(),
                    source,
                })?;
            }
        }
    }
    let mut written = Vec::with_capacity(files.len());
    for f in files {
        write_one(root, f)?;
        written.push(f.path.clone());
    }
    Ok(written)
}

/// kubelet refuses to create pods when its `resolvConf` is missing, and a node with a static
/// address and no DHCP lease has none: create it empty unless the DHCP thread already wrote it.
pub fn ensure_resolv_conf(root: &Path) -> Result<(), KubeFileError> {
    let path = under(root, Path::new(crate::net::RESOLV_CONF));
    if let Some(d) = path.parent() {
        fs::create_dir_all(d).map_err(|source| KubeFileError {
            op: "create the directory of",
            path: path.clone(),
            source,
        })?;
    }
    match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(KubeFileError {
            op: "create",
            path,
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::KubernetesConfig;
    use serde_json::json;

    fn section(pods: &[&str]) -> KubernetesConfig {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let pods: Vec<_> = pods
            .iter()
            .map(|n| json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": n}}))
            .collect();
        serde_json::from_value(json!({
            "api_server": "https://10.0.2.2:6443",
            "ca_cert": p.self_signed(&key).unwrap().pem(),
            "bootstrap_token": "abcdef.0123456789abcdef",
            "static_pods": pods,
        }))
        .unwrap()
    }

    #[test]
    fn files_are_written_with_their_modes_and_stale_pods_go() {
        let root = tempfile::tempdir().unwrap();
        let k = section(&["a", "b"]);
        let files = kube::files(&k);
        let written = write(root.path(), &files).unwrap();
        assert_eq!(written.len(), files.len());
        for f in &files {
            let p = under(root.path(), &f.path);
            assert_eq!(fs::read(&p).unwrap(), f.contents, "{}", p.display());
            let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, f.mode, "{}", p.display());
        }
        let boot = root.path().join("var/lib/kubelet/bootstrap-kubeconfig");
        assert_eq!(
            fs::metadata(boot).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let pods = root.path().join("run/keel/kubernetes/manifests");
        // a pod removed from the configuration is removed from kubelet's directory; a file
        // that is no pod manifest is left alone
        fs::write(pods.join("notes.txt"), "x").unwrap();
        write(root.path(), &kube::files(&section(&["b"]))).unwrap();
        let mut left: Vec<_> = fs::read_dir(&pods)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["b.json", "notes.txt"]);
    }

    #[test]
    fn a_write_that_cannot_happen_names_the_path() {
        let root = tempfile::tempdir().unwrap();
        // a file where a directory must be
        fs::write(root.path().join("var"), "").unwrap();
        let err = write(root.path(), &kube::files(&section(&[]))).unwrap_err();
        assert!(err.path.starts_with(root.path().join("var")), "{err}");
        assert!(err.to_string().contains("for kubelet"), "{err}");
    }

    #[test]
    fn resolv_conf_is_created_empty_but_never_replaced() {
        let root = tempfile::tempdir().unwrap();
        ensure_resolv_conf(root.path()).unwrap();
        let p = root.path().join("run/keel/resolv.conf");
        assert_eq!(fs::read(&p).unwrap(), b"");
        fs::write(&p, "nameserver 10.0.2.3\n").unwrap();
        ensure_resolv_conf(root.path()).unwrap();
        assert_eq!(fs::read_to_string(&p).unwrap(), "nameserver 10.0.2.3\n");
    }
}
