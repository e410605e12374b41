//! The update server the QEMU tests run on loopback: a small, real HTTP/1.1 server over
//! std::net that serves files from one directory, with `Range: bytes=N-` and `N-M` support
//! (the agent resumes downloads with it), and counts the bytes it sent per path.
//!
//! Guests reach it at http://10.0.2.100:8080/ through QEMU's guestfwd. It only reads files in
//! its directory (no `..`, no absolute paths).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone)]
pub struct UpdateServer {
    pub port: u16,
    pub root: PathBuf,
    sent: Arc<Mutex<BTreeMap<String, u64>>>,
}

/// The URL a guest uses for `name` in the served directory.
pub fn guest_url(name: &str) -> String {
    format!("http://10.0.2.100:8080/{name}")
}

impl UpdateServer {
    /// Serve `root` on a free loopback port, on background threads, for the rest of the process.
    pub fn start(root: &Path) -> UpdateServer {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind the update server");
        let port = l.local_addr().expect("local address").port();
        let s = UpdateServer {
            port,
            root: root.to_path_buf(),
            sent: Arc::default(),
        };
        let me = s.clone();
        std::thread::spawn(move || {
            for conn in l.incoming().flatten() {
                let me = me.clone();
                std::thread::spawn(move || {
                    let _ = me.handle(conn);
                });
            }
        });
        s
    }

    /// Body bytes sent so far for `name`.
    pub fn sent(&self, name: &str) -> u64 {
        self.sent
            .lock()
            .map(|m| m.get(name).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    fn handle(&self, conn: TcpStream) -> std::io::Result<()> {
        let mut r = BufReader::new(conn.try_clone()?);
        let mut w = conn;
        loop {
            let mut line = String::new();
            if r.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let mut parts = line.split_whitespace();
            let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let mut range: Option<(u64, Option<u64>)> = None;
            let mut close = false;
            loop {
                let mut h = String::new();
                if r.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
                    break;
                }
                let (k, v) = h.split_once(':').unwrap_or((&h, ""));
                let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
                if k == "range" {
                    range = v.strip_prefix("bytes=").and_then(|spec| {
                        let (a, b) = spec.split_once('-')?;
                        let a = a.parse().ok()?;
                        let b = if b.is_empty() {
                            None
                        } else {
                            Some(b.parse().ok()?)
                        };
                        Some((a, b))
                    });
                } else if k == "connection" && v.eq_ignore_ascii_case("close") {
                    close = true;
                }
            }
            let name = target.trim_start_matches('/');
            // a file of the served directory or of one directory below it
            let ok_name = !name.is_empty()
                && !name.contains("..")
                && name.split('/').count() <= 2
                && name.split('/').all(|c| !c.is_empty())
                && (method == "GET" || method == "HEAD");
            let path = self.root.join(name);
            let file = if ok_name {
                std::fs::File::open(&path).ok()
            } else {
                None
            };
            let Some(mut f) = file else {
                w.write_all(
                    b"HTTP/1.1 404 Not Found\r\ncontent-length: 9\r\nconnection: close\r\n\r\nnot found",
                )?;
                return Ok(());
            };
            let len = f.metadata()?.len();
            let (status, start, end) = match range {
                Some((a, b)) if a < len => {
                    let e = b.map_or(len - 1, |b| b.min(len - 1));
                    ("206 Partial Content", a, e)
                }
                Some(_) => {
                    w.write_all(
                        format!(
                            "HTTP/1.1 416 Range Not Satisfiable\r\ncontent-range: bytes */{len}\r\ncontent-length: 0\r\n\r\n"
                        )
                        .as_bytes(),
                    )?;
                    if close {
                        return Ok(());
                    }
                    continue;
                }
                None => ("200 OK", 0, len.saturating_sub(1)),
            };
            let body = if len == 0 { 0 } else { end + 1 - start };
            let mut head = format!(
                "HTTP/1.1 {status}\r\ncontent-length: {body}\r\naccept-ranges: bytes\r\ncontent-type: application/octet-stream\r\n"
            );
            if range.is_some() {
                head.push_str(&format!("content-range: bytes {start}-{end}/{len}\r\n"));
            }
            head.push_str("\r\n");
            w.write_all(head.as_bytes())?;
            if method == "GET" && body > 0 {
                f.seek(SeekFrom::Start(start))?;
                let mut left = body;
                let mut buf = vec![0u8; 256 << 10];
                while left > 0 {
                    let want = left.min(buf.len() as u64) as usize;
                    let n = f.read(&mut buf[..want])?;
                    if n == 0 {
                        break;
                    }
                    w.write_all(&buf[..n])?;
                    left -= n as u64;
                    if let Ok(mut m) = self.sent.lock() {
                        *m.entry(name.to_string()).or_default() += n as u64;
                    }
                }
            }
            if close {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    fn get(port: u16, path: &str, range: Option<&str>) -> (String, Vec<u8>) {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let mut req = format!("GET /{path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n");
        if let Some(r) = range {
            req.push_str(&format!("range: {r}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).unwrap();
        let mut all = Vec::new();
        s.read_to_end(&mut all).unwrap();
        let i = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        (
            String::from_utf8_lossy(&all[..i]).into_owned(),
            all[i + 4..].to_vec(),
        )
    }

    #[test]
    fn serves_whole_files_ranges_and_refuses_escapes() {
        let d = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
        std::fs::write(d.path().join("root.img"), &data).unwrap();
        let s = UpdateServer::start(d.path());
        let (h, b) = get(s.port, "root.img", None);
        assert!(h.starts_with("HTTP/1.1 200"), "{h}");
        assert_eq!(b, data);
        let (h, b) = get(s.port, "root.img", Some("bytes=99990-"));
        assert!(
            h.starts_with("HTTP/1.1 206") && h.contains("bytes 99990-99999/100000"),
            "{h}"
        );
        assert_eq!(b, &data[99_990..]);
        let (h, b) = get(s.port, "root.img", Some("bytes=10-19"));
        assert!(h.starts_with("HTTP/1.1 206"), "{h}");
        assert_eq!(b, &data[10..20]);
        assert_eq!(s.sent("root.img"), 100_000 + 10 + 10);
        let (h, _) = get(s.port, "root.img", Some("bytes=100000-"));
        assert!(h.starts_with("HTTP/1.1 416"), "{h}");
        // one directory below the served one
        std::fs::create_dir(d.path().join("r1")).unwrap();
        std::fs::write(d.path().join("r1/release.json"), b"{}").unwrap();
        let (h, b) = get(s.port, "r1/release.json", None);
        assert!(h.starts_with("HTTP/1.1 200"), "{h}");
        assert_eq!(b, b"{}");
        assert_eq!(s.sent("r1/release.json"), 2);
        for bad in [
            "../etc/passwd",
            "missing",
            "%2e%2e/x",
            "a/b/c",
            "a//b",
            "/x",
        ] {
            let (h, _) = get(s.port, bad, None);
            assert!(h.starts_with("HTTP/1.1 404"), "{bad}: {h}");
        }
    }
}
