//! The update server host: hyper's HTTP/1 server on a turmoil TcpListener, serving files from
//! memory with Range support. Faults are expressed by what the scenario puts at each path
//! (a corrupted delta, a delta for another base, a truncated file, the wrong image) and by
//! `fail_every_other` (a 500 on every other request).

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::convert::Infallible;
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
    count: AtomicU64,
    pub log: Mutex<Vec<Seen>>,
}

impl Server {
    pub fn new(files: HashMap<String, Vec<u8>>, fail_every_other: bool) -> Self {
        Server {
            files,
            fail_every_other,
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
            let mut r = Response::new(Full::new(Bytes::new()).boxed());
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
                size_answered: probe && !failed && self.files.contains_key(&path),
            });
        }
        if failed {
            return status(StatusCode::INTERNAL_SERVER_ERROR);
        }
        let Some(file) = self.files.get(&path) else {
            return status(StatusCode::NOT_FOUND);
        };
        let len = file.len() as u64;
        match range {
            None => {
                let mut r = Response::new(paced(Bytes::copy_from_slice(file)));
                r.headers_mut().insert(
                    hyper::header::CONTENT_LENGTH,
                    hyper::header::HeaderValue::from(len),
                );
                r
            }
            Some((from, _)) if from >= len => status(StatusCode::RANGE_NOT_SATISFIABLE),
            Some((from, to)) => {
                let to = to.unwrap_or(len - 1).min(len - 1);
                let body = Bytes::copy_from_slice(&file[from as usize..=to as usize]);
                let mut r = Response::new(paced(body));
                r.headers_mut().insert(
                    hyper::header::CONTENT_LENGTH,
                    hyper::header::HeaderValue::from(to + 1 - from),
                );
                *r.status_mut() = StatusCode::PARTIAL_CONTENT;
                if let Ok(v) = format!("bytes {from}-{to}/{len}").parse() {
                    r.headers_mut().insert(hyper::header::CONTENT_RANGE, v);
                }
                r
            }
        }
    }
}

type Body = BoxBody<Bytes, Infallible>;

/// The server's bandwidth: a chunk per pause, so a download spans many simulated ticks and the
/// network's faults land mid-body.
const CHUNK: usize = 4096;
const PAUSE: Duration = Duration::from_millis(5);

fn paced(data: Bytes) -> Body {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
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

/// Serve `server` on port 80 of the current turmoil host until the simulation ends.
pub async fn serve(server: Arc<Server>) -> turmoil::Result {
    let listener = turmoil::net::TcpListener::bind("0.0.0.0:80").await?;
    loop {
        let (stream, peer) = listener.accept().await?;
        let peer = peer.ip().to_string();
        let server = server.clone();
        tokio::task::spawn_local(async move {
            let svc = service_fn(move |req| {
                let r = server.answer(&req, &peer);
                async move { Ok::<_, Infallible>(r) }
            });
            // A connection the network breaks ends here; the client resumes with Range.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
