//! src/fetch against a real HTTP server on loopback: cuts mid-body resumed with Range requests,
//! a server that ignores Range, 404 and 500 answers, bad URLs.
#![allow(clippy::unwrap_used, clippy::panic)]

mod agent_common;

use agent_common::{http_server, image, sha};
use keelos::fetch::{FetchError, Fetcher, Policy, TcpConnect};
use std::sync::atomic::Ordering;
use std::time::Duration;

fn fetcher() -> Fetcher {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    Fetcher::new(
        TcpConnect,
        std::sync::Arc::new(tls),
        Policy {
            connect_timeout: Duration::from_secs(5),
            stall_timeout: Duration::from_secs(5),
            max_attempts: 4,
            backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
        },
    )
}

async fn fetch_all(f: &Fetcher, url: &str, offset: u64) -> Result<(Vec<u8>, u32), FetchError> {
    let mut d = f.get(url, offset)?;
    let mut out = Vec::new();
    while let Some(b) = d.next().await? {
        out.extend_from_slice(&b);
    }
    Ok((out, d.reconnects()))
}

#[tokio::test]
async fn download_cut_several_times_completes_through_range_requests() {
    let srv = http_server().await;
    let data = image(7, 3 << 20);
    srv.put("/img", data.clone());
    srv.state.cuts.store(5, Ordering::SeqCst);
    srv.state.cut_after.store(300_000, Ordering::SeqCst);
    let (got, reconnects) = fetch_all(&fetcher(), &srv.url("/img"), 0).await.unwrap();
    assert_eq!(reconnects, 5);
    assert_eq!(
        sha(&got),
        sha(&data),
        "the resumed download must be byte-identical"
    );
    let ranges = srv.state.ranges.lock().unwrap().clone();
    assert_eq!(ranges.len(), 6, "{ranges:?}");
    assert_eq!(ranges[0], "", "the first request asks for the whole file");
    // each resume asks for exactly the next byte not yet received
    let mut expect = 0u64;
    for r in &ranges[1..] {
        let from: u64 = r
            .strip_prefix("bytes=")
            .unwrap()
            .trim_end_matches('-')
            .parse()
            .unwrap();
        assert!(from > expect, "{ranges:?}");
        expect = from;
    }
}

#[tokio::test]
async fn resume_from_an_offset_uses_range() {
    let srv = http_server().await;
    let data = image(3, 500_000);
    srv.put("/img", data.clone());
    let (got, _) = fetch_all(&fetcher(), &srv.url("/img"), 123_456)
        .await
        .unwrap();
    assert_eq!(got, data[123_456..]);
    assert_eq!(srv.state.ranges.lock().unwrap()[0], "bytes=123456-");
}

#[tokio::test]
async fn a_server_ignoring_range_is_handled() {
    let srv = http_server().await;
    let data = image(9, 1 << 20);
    srv.put("/img", data.clone());
    srv.state.ignore_range.store(true, Ordering::SeqCst);
    // Nothing written yet: a plain download works (no Range is sent at offset 0).
    let (got, _) = fetch_all(&fetcher(), &srv.url("/img"), 0).await.unwrap();
    assert_eq!(got, data);
    // Cut after some bytes were handed out: the resume gets 200 and fails cleanly.
    srv.state.cuts.store(1, Ordering::SeqCst);
    srv.state.cut_after.store(100_000, Ordering::SeqCst);
    let f = fetcher();
    let mut d = f.get(&srv.url("/img"), 0).unwrap();
    let mut n = 0u64;
    let err = loop {
        match d.next().await {
            Ok(Some(b)) => n += b.len() as u64,
            Ok(None) => panic!("completed although the server ignored Range after a cut"),
            Err(e) => break e,
        }
    };
    assert!(n > 0);
    match err {
        FetchError::RangeIgnored { offset, .. } => assert_eq!(offset, n),
        other => panic!("{other}"),
    }
    // Resuming from a checkpoint against such a server fails the same way, before any byte.
    match fetch_all(&f, &srv.url("/img"), 10).await {
        Err(FetchError::RangeIgnored { offset: 10, .. }) => {}
        other => panic!("{:?}", other.map(|x| x.0.len())),
    }
}

#[tokio::test]
async fn bad_urls_and_http_errors_are_clean_errors() {
    let srv = http_server().await;
    let f = fetcher();
    match fetch_all(&f, &srv.url("/404"), 0).await {
        Err(e @ FetchError::Status { status: 404, .. }) => {
            assert!(e.to_string().contains("not found"), "{e}")
        }
        other => panic!("{:?}", other.map(|x| x.0.len())),
    }
    match fetch_all(&f, &srv.url("/500"), 0).await {
        Err(FetchError::ServerError {
            status: 500,
            attempts: 4,
            ..
        }) => {}
        other => panic!("{:?}", other.map(|x| x.0.len())),
    }
    assert_eq!(
        srv.state.ranges.lock().unwrap().len(),
        5,
        "404 is not retried, 500 is retried up to the bound"
    );
    for bad in ["", "::::", "http//x/y", "localhost/img"] {
        assert!(
            matches!(f.get(bad, 0), Err(FetchError::BadUrl { .. })),
            "{bad:?}"
        );
    }
    for bad in ["ftp://127.0.0.1/x", "file:///etc/passwd", "gopher://h/"] {
        assert!(
            matches!(f.get(bad, 0), Err(FetchError::UnsupportedScheme { .. })),
            "{bad:?}"
        );
    }
    // Nothing listening: bounded retries, then a clean error naming the cause.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = dead.local_addr().unwrap();
    drop(dead);
    match fetch_all(&f, &format!("http://{addr}/x"), 0).await {
        Err(e @ FetchError::GaveUp { attempts: 4, .. }) => {
            assert!(e.to_string().contains("connecting"), "{e}")
        }
        other => panic!("{:?}", other.map(|x| x.0.len())),
    }
}

#[tokio::test]
async fn a_server_that_cuts_every_response_after_one_byte_still_completes() {
    let srv = http_server().await;
    srv.state.cuts.store(1000, Ordering::SeqCst);
    srv.state.cut_after.store(1, Ordering::SeqCst);
    // Every response carries one byte and is cut (except the last byte's): each cut is resumed
    // at the next byte, and progress resets the retry budget.
    srv.put("/tiny", image(2, 8));
    let (got, reconnects) = fetch_all(&fetcher(), &srv.url("/tiny"), 0).await.unwrap();
    assert_eq!(got, image(2, 8));
    assert_eq!(reconnects, 7);
}

/// An update server on https (rustls, with a certificate from a KeelOS CA): the download
/// verifies against the CA bundle it is given, and is refused with another one.
#[tokio::test]
async fn https_downloads_verify_the_server_against_the_ca_bundle() {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let dir = tempfile::tempdir().unwrap();
    let pki_dir = dir.path().join("pki");
    keelos::pki::generate(&pki_dir, &["127.0.0.1".into(), "localhost".into()], None).unwrap();
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(pki_dir.join(keelos::pki::AGENT_CERT))
            .unwrap()
            .map(|c| c.unwrap())
            .collect();
    let key = PrivateKeyDer::from_pem_file(pki_dir.join(keelos::pki::AGENT_KEY)).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let server_cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(server_cfg));
    let data = image(9, 300_000);
    let body = bytes::Bytes::from(data.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, body) = (acceptor.clone(), body.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |_req| {
                    let body = body.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(
                            http_body_util::Full::new(body),
                        ))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    let url = format!("https://127.0.0.1:{}/img", addr.port());
    let policy = Policy {
        connect_timeout: Duration::from_secs(5),
        stall_timeout: Duration::from_secs(5),
        max_attempts: 2,
        backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(50),
    };
    let ca = keelos::fetch::tls_with_ca_bundle(&pki_dir.join(keelos::pki::CA_CERT)).unwrap();
    let f = Fetcher::new(TcpConnect, ca, policy.clone());
    let (got, _) = fetch_all(&f, &url, 0).await.unwrap();
    assert_eq!(sha(&got), sha(&data));
    // with another CA's bundle the server is not trusted
    let other = dir.path().join("other");
    keelos::pki::generate(&other, &["127.0.0.1".into()], None).unwrap();
    let wrong = keelos::fetch::tls_with_ca_bundle(&other.join(keelos::pki::CA_CERT)).unwrap();
    let f = Fetcher::new(TcpConnect, wrong, policy);
    let err = fetch_all(&f, &url, 0).await.unwrap_err();
    assert!(err.to_string().contains("TLS"), "{err}");
}

/// A hyper server whose full answer has no Content-Length and is cut right after its last byte
/// (the body ends in an error, so the terminating chunk never comes); a Range request at or past
/// the end gets 416 with `Content-Range: bytes */CLAIMED`.
async fn lengthless_cut_server(
    data: Vec<u8>,
    claimed: u64,
) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use bytes::Bytes;
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Frame;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let ranges = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = ranges.clone();
    let data = Bytes::from(data);
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (data, seen) = (data.clone(), seen.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<_>| {
                    let range = req
                        .headers()
                        .get(hyper::header::RANGE)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    seen.lock().unwrap().push(range.clone());
                    let data = data.clone();
                    async move {
                        type B = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;
                        let mut r: hyper::Response<B> = if range.is_empty() {
                            let (tx, rx) = tokio::sync::mpsc::channel(4);
                            tokio::spawn(async move {
                                let half = data.len() / 2;
                                let _ = tx.send(Ok(Frame::data(data.slice(..half)))).await;
                                let _ = tx.send(Ok(Frame::data(data.slice(half..)))).await;
                                // Let hyper flush the last byte, then fail the body: the
                                // connection closes without the terminating chunk.
                                tokio::time::sleep(Duration::from_millis(100)).await;
                                let _ = tx.send(Err(std::io::Error::other("cut"))).await;
                            });
                            let body = tokio_stream::wrappers::ReceiverStream::new(rx);
                            hyper::Response::new(StreamBody::new(body).boxed())
                        } else {
                            let mut r = hyper::Response::new(
                                http_body_util::Empty::new()
                                    .map_err(|never| match never {})
                                    .boxed(),
                            );
                            *r.status_mut() = hyper::StatusCode::RANGE_NOT_SATISFIABLE;
                            r.headers_mut().insert(
                                hyper::header::CONTENT_RANGE,
                                format!("bytes */{claimed}").parse().unwrap(),
                            );
                            r
                        };
                        r.headers_mut().remove(hyper::header::CONTENT_LENGTH);
                        Ok::<_, std::convert::Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (format!("http://{addr}/img"), ranges)
}

/// Found by review of the 416 handling: a length-less body cut right after its last byte
/// resumes with a Range at the end; the server's 416 `bytes */LEN` with LEN the bytes received
/// means the download is complete, not failed.
#[tokio::test]
async fn a_lengthless_body_cut_after_its_last_byte_completes_on_416() {
    let data = image(5, 200_000);
    let (url, ranges) = lengthless_cut_server(data.clone(), data.len() as u64).await;
    let (got, reconnects) = fetch_all(&fetcher(), &url, 0).await.unwrap();
    assert_eq!(sha(&got), sha(&data));
    assert_eq!(reconnects, 1);
    assert_eq!(
        *ranges.lock().unwrap(),
        vec![String::new(), format!("bytes={}-", data.len())]
    );
    // A 416 naming another length is a failure, not a completion.
    let (url, _) = lengthless_cut_server(data.clone(), data.len() as u64 + 10).await;
    match fetch_all(&fetcher(), &url, 0).await {
        Err(FetchError::Status { status: 416, .. }) => {}
        other => panic!("{:?}", other.map(|x| x.0.len())),
    }
}
