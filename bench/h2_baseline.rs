//! Plain hyper 1.x HTTP/2 "Hello, World!" server: the reference point that
//! `bench/bin/h2-bench` compares pagi-rs `--http2` against, and the plain
//! rustls server that `bench/bin/tls-bench` compares pagi-rs
//! `--ssl-cert/--ssl-key` against.  It also stands in for pagi-rs while the
//! frame-level test client (t/lib/h2client.py) is checked by
//! t/03-h2-harness.t, hence the few paths besides hello world.
//!
//! Cleartext: h2c with prior knowledge only (what h2load speaks to an
//! `http://` URL).  With `--tls CERT KEY`: rustls (ring provider), ALPN
//! offering h2 and http/1.1, the protocol chosen by ALPN (HTTP/1.1 when the
//! client offers no ALPN).  The HTTP/2 settings are the ones the issue asks
//! of pagi-rs: at most 100 concurrent streams, a 64 KiB header list, and
//! SETTINGS_ENABLE_CONNECT_PROTOCOL for WebSocket over HTTP/2 (RFC 8441).
//!
//! Paths (every other path, and every method, gets hello world):
//! - `/delay/MS`: hello world after MS milliseconds (at most 60 s);
//! - `/echo`: the request body back, frame by frame as it is read;
//! - `/bytes/N`: N bytes of `x` (at most 16 MiB), in one frame;
//! - `GET /stream`: 1 MiB as 16 frames of 64 KiB (`GET /stream-produced`:
//!   the same frames from a producer task, one at a time), and with `--file PATH`,
//!   `GET /file`: that file read by position 64 KiB at a time; with
//!   `/echo`, what hyper-baseline serves to `bench/bin/body-bench`, here
//!   for its `--http2` runs (`bench/common/bodies.rs`);
//! - an extended CONNECT with `:protocol websocket` (any path): 200, then a
//!   WebSocket echo of every text and binary message until the close.
//!
//! SIGTERM or SIGINT: stop accepting, send GOAWAY on every HTTP/2
//! connection (and close idle HTTP/1.1 ones), let open streams finish, exit.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use hyper::body::Incoming;
use hyper::ext::Protocol;
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{signal, SignalKind};
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

#[path = "common/bodies.rs"]
mod bodies;
#[path = "common/runtime.rs"]
mod runtime;

use bodies::Body;

const BODY: &[u8] = b"Hello, World!";
const NAME: &str = "h2-baseline";
/// The defaults for pagi-rs, so that both sides announce the same.
const MAX_CONCURRENT_STREAMS: u32 = 100;
const MAX_HEADER_LIST_SIZE: u32 = 64 * 1024;
const MAX_DELAY_MS: u64 = 60_000;
const MAX_BYTES: usize = 16 * 1024 * 1024;
/// How long open streams may take to finish after SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Parser, Debug)]
#[command(about = "Plain hyper HTTP/2 hello-world server (benchmark and test baseline)")]
struct Args {
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,

    /// Port to bind; 0 picks a free ephemeral port.
    #[arg(long, default_value_t = 5003)]
    port: u16,

    /// Serve TLS with this PEM certificate chain and PEM private key
    /// (PKCS#8, PKCS#1 or SEC1); ALPN offers h2 and http/1.1.
    #[arg(long, num_args = 2, value_names = ["CERT", "KEY"])]
    tls: Option<Vec<PathBuf>>,

    /// The file `GET /file` serves.
    #[arg(long)]
    file: Option<PathBuf>,
}

fn hello() -> Response<Body> {
    let mut res = Response::new(bodies::full(Bytes::from_static(BODY)));
    let headers = res.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    headers.insert(CONTENT_LENGTH, HeaderValue::from(BODY.len()));
    res
}

fn status(code: StatusCode) -> Response<Body> {
    let mut res = Response::new(bodies::full(Bytes::new()));
    *res.status_mut() = code;
    res
}

/// The number after `prefix` in `path`, if `path` is `prefix` + digits.
fn number_after<T: std::str::FromStr>(path: &str, prefix: &str) -> Option<T> {
    path.strip_prefix(prefix)?.parse().ok()
}

async fn handle(
    mut req: Request<Incoming>,
    file: Option<Arc<PathBuf>>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path();
    if req.method() == Method::CONNECT {
        let is_websocket = req
            .extensions()
            .get::<Protocol>()
            .is_some_and(|p| p.as_str() == "websocket");
        if !is_websocket {
            return Ok(status(StatusCode::NOT_IMPLEMENTED));
        }
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            // Resolves once the 200 is sent; fails if the client reset first.
            if let Ok(upgraded) = upgrade.await {
                let ws =
                    WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None)
                        .await;
                websocket_echo(ws).await;
            }
        });
        return Ok(status(StatusCode::OK));
    }
    if let Some(ms) = number_after::<u64>(path, "/delay/") {
        tokio::time::sleep(Duration::from_millis(ms.min(MAX_DELAY_MS))).await;
        return Ok(hello());
    }
    if let Some(n) = number_after::<usize>(path, "/bytes/") {
        let body = Bytes::from(vec![b'x'; n.min(MAX_BYTES)]);
        return Ok(Response::new(bodies::full(body)));
    }
    if path == "/echo" {
        return Ok(bodies::echo_response(req.into_body()));
    }
    if req.method() == Method::GET {
        match (path, file.as_deref()) {
            ("/stream", _) => return Ok(bodies::stream_response()),
            ("/stream-produced", _) => return Ok(bodies::produced_stream_response()),
            ("/file", Some(file)) => return Ok(bodies::file_response(file)),
            _ => {}
        }
    }
    Ok(hello())
}

async fn websocket_echo<S>(mut ws: WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    while let Some(Ok(msg)) = ws.next().await {
        let reply = match msg {
            Message::Text(_) | Message::Binary(_) => msg,
            // tungstenite answers pings and echoes the close by itself.
            _ => continue,
        };
        if ws.send(reply).await.is_err() {
            break;
        }
    }
}

fn http2_builder() -> http2::Builder<TokioExecutor> {
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .enable_connect_protocol();
    builder
}

fn tls_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, String> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Serves one connection until it ends or, after `graceful` starts, until
/// its streams have finished.
async fn serve(
    stream: TcpStream,
    tls: Option<TlsAcceptor>,
    file: Option<Arc<PathBuf>>,
    graceful: Watcher,
) {
    let handle = service_fn(move |req| handle(req, file.clone()));
    // Client resets, failed handshakes and aborted requests are normal
    // during a benchmark, so the results of the connections are dropped.
    let Some(acceptor) = tls else {
        let conn = http2_builder().serve_connection(TokioIo::new(stream), handle);
        let _ = graceful.watch(conn).await;
        return;
    };
    let Ok(stream) = acceptor.accept(stream).await else {
        return;
    };
    if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
        let conn = http2_builder().serve_connection(TokioIo::new(stream), handle);
        let _ = graceful.watch(conn).await;
    } else {
        let conn = http1::Builder::new()
            .keep_alive(true)
            .serve_connection(TokioIo::new(stream), handle);
        let _ = graceful.watch(conn).await;
    }
}

fn main() -> std::process::ExitCode {
    let done = runtime::run(run(Args::parse())).map_err(|e| format!("tokio runtime: {e}"));
    match done.and_then(|served| served) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{NAME}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let tls = match args.tls.as_deref() {
        Some([cert, key]) => Some(tls_acceptor(cert, key)?),
        Some(_) => return Err("--tls takes CERT and KEY".into()),
        None => None,
    };
    let listener = TcpListener::bind((args.host.as_str(), args.port))
        .await
        .map_err(|e| format!("bind {}:{}: {e}", args.host, args.port))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    // The benchmark scripts and the tests parse this line to learn the port.
    eprintln!("{NAME}: listening on {scheme}://{addr}/");

    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let graceful = GracefulShutdown::new();
    let file = args.file.map(Arc::new);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = term.recv() => break,
            _ = int.recv() => break,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(e) => {
                // Typically EMFILE under heavy load: back off instead of spinning.
                eprintln!("{NAME}: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Same as pagi-rs: small responses should not wait for Nagle.
        let _ = stream.set_nodelay(true);
        // Subscribed here, before the TLS handshake: a shutdown that comes
        // during the handshake still reaches the connection.
        tokio::spawn(serve(stream, tls.clone(), file.clone(), graceful.watcher()));
    }

    drop(listener);
    eprintln!("{NAME}: shutting down: GOAWAY sent, waiting for open streams");
    match tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await {
        Ok(()) => eprintln!("{NAME}: all connections closed"),
        Err(_) => eprintln!("{NAME}: streams still open after {SHUTDOWN_GRACE:?}; exiting"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_paths_take_a_number_and_nothing_else() {
        assert_eq!(number_after::<u64>("/delay/250", "/delay/"), Some(250));
        assert_eq!(number_after::<u64>("/delay/", "/delay/"), None);
        assert_eq!(number_after::<u64>("/delay/1x", "/delay/"), None);
        assert_eq!(number_after::<usize>("/bytes/-1", "/bytes/"), None);
        assert_eq!(number_after::<usize>("/other/5", "/bytes/"), None);
    }
}
