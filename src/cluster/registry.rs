//! A real OCI registry on loopback for tests: Debian's `docker-registry` (the CNCF distribution
//! registry) serving plain HTTP on 127.0.0.1 without authentication, with images pushed by
//! Debian's `skopeo`.
//!
//! Host side only. Everything it writes (configuration, storage, log, skopeo's trust policy)
//! stays in the directory it is given; the registry process is stopped when the [`Registry`] is
//! dropped.

use super::process::{self, Component};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Debian's registry binary (package docker-registry).
pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";
/// Debian's skopeo (package skopeo).
pub const SKOPEO: &str = "skopeo";
const INSTALL_HINT: &str = "apt-get install docker-registry skopeo, or run ci/install-deps";
/// How long the registry may take to answer `GET /v2/`.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running registry; dropping it stops the process.
#[derive(Debug)]
pub struct Registry {
    /// Holds config.yml, storage/, registry.log and policy.json.
    pub dir: PathBuf,
    /// The HTTP port on 127.0.0.1.
    pub port: u16,
    component: Component,
}

/// The registry's configuration: filesystem storage under `storage`, plain HTTP on
/// 127.0.0.1:`port`, no authentication.
pub fn config_yaml(storage: &Path, port: u16) -> String {
    format!(
        "version: 0.1\n\
         log:\n  level: info\n\
         storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
         http:\n  addr: 127.0.0.1:{port}\n",
        storage.display()
    )
}

/// skopeo's trust policy for pushing local test images: accept anything.
pub const POLICY_JSON: &str = r#"{"default":[{"type":"insecureAcceptAnything"}]}"#;

/// An HTTP response: status, headers (names lowercased) and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Split a raw HTTP/1.x response (read to the end of the connection).
pub fn parse_response(raw: &[u8]) -> Result<Response, String> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no end of the HTTP header")?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|e| format!("HTTP header: {e}"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad HTTP status line {status_line:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(Response {
        status,
        headers,
        body: raw[end + 4..].to_vec(),
    })
}

/// `GET path` from 127.0.0.1:`port` over HTTP/1.0 (so the body is not chunked and ends with
/// the connection).
pub fn http_get(port: u16, path: &str, accept: &str) -> Result<Response, String> {
    let addr = format!("127.0.0.1:{port}");
    let mut s = TcpStream::connect(&addr).map_err(|e| format!("connecting to {addr}: {e}"))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: {accept}\r\n\r\n");
    s.write_all(req.as_bytes())
        .map_err(|e| format!("sending to {addr}: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .map_err(|e| format!("reading from {addr}: {e}"))?;
    parse_response(&raw)
}

impl Registry {
    /// Start `docker-registry serve` with its storage, configuration and log in `dir` (created
    /// if missing) on a free port, and wait until `GET /v2/` answers 200.
    pub fn start(dir: &Path) -> Result<Registry, String> {
        if !Path::new(REGISTRY_BIN).is_file() {
            return Err(format!("{REGISTRY_BIN} not found: {INSTALL_HINT}"));
        }
        let storage = dir.join("storage");
        std::fs::create_dir_all(&storage)
            .map_err(|e| format!("creating {}: {e}", storage.display()))?;
        let port = process::free_port().map_err(|e| e.to_string())?;
        let config = dir.join("config.yml");
        std::fs::write(&config, config_yaml(&storage, port))
            .map_err(|e| format!("writing {}: {e}", config.display()))?;
        let component = Component::spawn(
            "docker-registry",
            Path::new(REGISTRY_BIN),
            &["serve".to_string(), config.display().to_string()],
            dir.join("registry.log"),
        )
        .map_err(|e| format!("{e} ({INSTALL_HINT})"))?;
        let mut r = Registry {
            dir: dir.to_path_buf(),
            port,
            component,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            r.component.check().map_err(|e| e.to_string())?;
            let last = match http_get(port, "/v2/", "application/json") {
                Ok(resp) if resp.status == 200 => return Ok(r),
                Ok(resp) => format!("HTTP {}", resp.status),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                return Err(format!(
                    "the registry on 127.0.0.1:{port} did not answer GET /v2/ with 200 within \
                     {} s (last: {last}); its log is {}:\n{}",
                    START_TIMEOUT.as_secs(),
                    r.component.log.display(),
                    process::log_tail(&r.component.log, 15)
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `127.0.0.1:PORT`, the registry part of an image reference.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `GET path` from the registry.
    pub fn get(&self, path: &str, accept: &str) -> Result<Response, String> {
        http_get(self.port, path, accept)
    }

    /// The registry's log file.
    pub fn log(&self) -> &Path {
        &self.component.log
    }

    /// Stop the registry now (SIGTERM, then SIGKILL after 10 s).
    pub fn stop(&mut self) {
        self.component.stop(Duration::from_secs(10));
    }
}

/// Push the image tagged `tag` in the OCI layout `layout` to `registry` as `repo_and_tag`
/// (`REPO:TAG`), with `skopeo copy`. Digests are preserved: the registry serves the manifest
/// and blobs exactly as they are in the layout.
pub fn push_oci_layout(
    layout: &Path,
    tag: &str,
    registry: &Registry,
    repo_and_tag: &str,
) -> Result<(), String> {
    // skopeo refuses to copy without a trust policy, and the system one (/etc/containers) may be
    // missing or strict; a test registry's images need none.
    let policy = registry.dir.join("policy.json");
    std::fs::write(&policy, POLICY_JSON)
        .map_err(|e| format!("writing {}: {e}", policy.display()))?;
    let src = format!("oci:{}:{tag}", layout.display());
    let dest = format!("docker://{}/{repo_and_tag}", registry.host());
    let out = Command::new(SKOPEO)
        .arg("--policy")
        .arg(&policy)
        .args([
            "copy",
            "--quiet",
            "--preserve-digests",
            "--dest-tls-verify=false",
            "--dest-no-creds",
            &src,
            &dest,
        ])
        .output()
        .map_err(|e| format!("cannot run {SKOPEO}: {e} ({INSTALL_HINT})"))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "skopeo copy {src} {dest} failed ({}): {}; is the registry running (its log: {})?",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim(),
        registry.log().display()
    ))
}

/// Build the pause image ([`crate::image::oci::pause_image`]) into `work/pause-oci` and push it
/// to `registry` as `pause:`[`crate::image::oci::PAUSE_TAG`]. Returns the manifest digest.
pub fn push_pause_image(registry: &Registry, work: &Path) -> Result<String, String> {
    use crate::image::oci;
    let image = oci::pause_image(oci::PAUSE_TAG).map_err(|e| e.to_string())?;
    let layout = work.join("pause-oci");
    let _ = std::fs::remove_dir_all(&layout);
    oci::write_layout(&image, &layout).map_err(|e| e.to_string())?;
    push_oci_layout(
        &layout,
        oci::PAUSE_TAG,
        registry,
        &format!("pause:{}", oci::PAUSE_TAG),
    )?;
    Ok(image.manifest.digest)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_config_listens_on_loopback_only_with_storage_in_the_dir() {
        let c = config_yaml(Path::new("/r/storage"), 5123);
        assert!(c.contains("addr: 127.0.0.1:5123\n"), "{c}");
        assert!(c.contains("rootdirectory: /r/storage\n"), "{c}");
        assert!(!c.contains("auth"), "{c}");
    }

    #[test]
    fn responses_are_split_into_status_headers_and_body() {
        let r = parse_response(
            b"HTTP/1.0 200 OK\r\nDocker-Content-Digest: sha256:ab\r\nX: y\r\n\r\n{}\r\n\r\nz",
        )
        .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("docker-content-digest"), Some("sha256:ab"));
        assert_eq!(r.body, b"{}\r\n\r\nz");
        assert!(parse_response(b"HTTP/1.0 200 OK\r\n").is_err());
    }
}
