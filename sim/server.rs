//! The update server host: hyper's HTTP/1 server on a turmoil TcpListener, serving files from
//! memory with Range support. Faults are expressed by what the scenario puts at each path
//! (a corrupted delta, a delta for another base, a truncated file, the wrong image), by
//! `fail_every_other` (a 500 on every other request) and by `lengthless` (no Content-Length and
//! no total in Content-Range, and every answer that carries a file's last byte cut right after
//! it, so the client resumes at the end and gets 416 `bytes */LEN`). Served over http (port 80)
//! and https (port 443, rustls with a certificate of the simulation's CA).

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One request as the server saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub path: String,
    /// The first byte asked for (0 without a Range header).
    pub from: u64,
    pub peer: String,
    /// fetch's size probe (`Range: bytes=0-0`) answered with 206.
    pub size_answered: bool,
}

#[derive(Debug, Default)]
pub struct Server {
    pub files: HashMap<String, Vec<u8>>,
    pub fail_every_other: bool,
    pub lengthless: bool,
    count: AtomicU64,
    pub log: Mutex<Vec<Seen>>,
}

impl Server {
    pub fn new(files: HashMap<String, Vec<u8>>, fail_every_other: bool) -> Self {
        Server {
            files,
            fail_every_other,
            lengthless: false,
            count: AtomicU64::new(0),
            log: Mutex::new(Vec::new()),
        }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.log.lock().map(|g| g.clone()).unwrap_or_default()
    }

    fn answer(&self, req: &Request<hyper::body::Incoming>, peer: &str) -> Response<Body> {
        let n = self.count.fetch_add(1, Ordering::SeqCst);
        let path = req.uri().path().to_string();
        let range = req
            .headers()
            .get(hyper::header::RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_range);
        let status = |s: StatusCode| {
            let mut r = Response::new(Full::new(Bytes::new()).map_err(|e| match e {}).boxed());
            *r.status_mut() = s;
            r
        };
        let failed = self.fail_every_other && n % 2 == 1;
        let probe = range == Some((0, Some(0)));
        if let Ok(mut g) = self.log.lock() {
            g.push(Seen {
                path: path.clone(),
                from: range.map_or(0, |r| r.0),
                peer: peer.to_string(),
                size_answered: probe
                    && !failed
                    && !self.lengthless
                    && self.files.contains_key(&path),
            });
        }
        if failed {
            return status(StatusCode::INTERNAL_SERVER_ERROR);
        }
        let Some(file) = self.files.get(&path) else {
            return status(StatusCode::NOT_FOUND);
        };
        let len = file.len() as u64;
        let lengthless = self.lengthless;
        match range {
            None => {
                let mut r = Response::new(paced(Bytes::copy_from_slice(file), lengthless));
                if !lengthless {
                    r.headers_mut().insert(
                        hyper::header::CONTENT_LENGTH,
                        hyper::header::HeaderValue::from(len),
                    );
                }
                r
            }
            Some((from, _)) if from >= len => {
                let mut r = status(StatusCode::RANGE_NOT_SATISFIABLE);
                if let Ok(v) = format!("bytes */{len}").parse() {
                    r.headers_mut().insert(hyper::header::CONTENT_RANGE, v);
                }
                r
            }
            Some((from, to)) => {
                let to = to.unwrap_or(len - 1).min(len - 1);
                let body = Bytes::copy_from_slice(&file[from as usize..=to as usize]);
                let mut r = Response::new(paced(body, lengthless && to == len - 1));
                let total = if lengthless {
                    "*".to_string()
                } else {
                    r.headers_mut().insert(
                        hyper::header::CONTENT_LENGTH,
                        hyper::header::HeaderValue::from(to + 1 - from),
                    );
                    len.to_string()
                };
                *r.status_mut() = StatusCode::PARTIAL_CONTENT;
                if let Ok(v) = format!("bytes {from}-{to}/{total}").parse() {
                    r.headers_mut().insert(hyper::header::CONTENT_RANGE, v);
                }
                r
            }
        }
    }
}

type Body = BoxBody<Bytes, io::Error>;

/// The server's bandwidth: a chunk per pause, so a download spans many simulated ticks and the
/// network's faults land mid-body.
const CHUNK: usize = 4096;
const PAUSE: Duration = Duration::from_millis(5);

/// `data` sent a chunk per pause; with `cut_at_end` the body fails right after its last byte
/// (hyper then closes the connection without ending the body).
fn paced(data: Bytes, cut_at_end: bool) -> Body {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, io::Error>>(1);
    tokio::task::spawn_local(async move {
        let mut at = 0;
        while at < data.len() {
            let end = (at + CHUNK).min(data.len());
            if tx.send(Ok(Frame::data(data.slice(at..end)))).await.is_err() {
                return;
            }
            at = end;
            tokio::time::sleep(PAUSE).await;
        }
        if cut_at_end {
            let _ = tx
                .send(Err(io::Error::other("cut after the last byte")))
                .await;
        }
    });
    StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)).boxed()
}

fn parse_range(v: &str) -> Option<(u64, Option<u64>)> {
    let r = v.strip_prefix("bytes=")?;
    let (a, b) = r.split_once('-')?;
    let a = a.trim().parse().ok()?;
    let b = if b.trim().is_empty() {
        None
    } else {
        Some(b.trim().parse().ok()?)
    };
    Some((a, b))
}

/// Serve `server` on ports 80 (http) and 443 (https) of the current turmoil host until the
/// simulation ends.
pub async fn serve(server: Arc<Server>) -> turmoil::Result {
    let http = turmoil::net::TcpListener::bind("0.0.0.0:80").await?;
    let https = turmoil::net::TcpListener::bind("0.0.0.0:443").await?;
    let s2 = server.clone();
    tokio::task::spawn_local(async move {
        let tls = tokio_rustls::TlsAcceptor::from(crate::pki().server_tls());
        while let Ok((stream, peer)) = https.accept().await {
            let (server, tls) = (s2.clone(), tls.clone());
            tokio::task::spawn_local(async move {
                if let Ok(stream) = tls.accept(stream).await {
                    connection(server, stream, peer.ip().to_string()).await;
                }
            });
        }
    });
    loop {
        let (stream, peer) = http.accept().await?;
        tokio::task::spawn_local(connection(server.clone(), stream, peer.ip().to_string()));
    }
}

async fn connection<S>(server: Arc<Server>, stream: S, peer: String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + 'static,
{
    let svc = service_fn(move |req| {
        let r = server.answer(&req, &peer);
        async move { Ok::<_, Infallible>(r) }
    });
    // A connection the network breaks ends here; the client resumes with Range.
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), svc)
        .await;
}
