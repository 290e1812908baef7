//! TLS handshake load generator for `bench/bin/tls-bench`.
//!
//! Runs `--concurrency` tasks for `--duration` seconds; each loops: TCP
//! connect, full TLS handshake (tokio-rustls, ring provider, session
//! resumption off, so every handshake is a full one), one HTTP/1.1
//! `GET` with `Connection: close`, read the whole response, wait for the
//! server to close, next.  It prints the handshakes completed per second and
//! the p50/p99 handshake time (TCP connect to handshake done), wrk-style, on
//! stdout.  Each response must be a 200 with its whole body; anything else
//! counts as an error.
//!
//! The client does not check the server's certificate chain (the bench uses
//! a throw-away self-signed one) but does verify the handshake signature,
//! so the server's private-key operation is proven on every handshake.
//!
//! `--check` makes one connection, prints what was negotiated (TLS version,
//! cipher suite, ALPN) and the response, and exits 1 unless it got a 200.

use std::fmt;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

#[path = "common.rs"]
mod common;

/// No request or response may take longer than this.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// A response head larger than this is not what the bench servers send.
const MAX_RESPONSE: usize = 1 << 20;

#[derive(Parser, Debug)]
#[command(about = "TLS handshake load generator (full handshakes/s and handshake time)")]
struct Args {
    /// Server URL, e.g. https://127.0.0.1:5443/
    url: String,

    /// Concurrent tasks, each with one connection at a time.
    #[arg(short, long, default_value_t = 20)]
    concurrency: usize,

    /// Seconds to run for.
    #[arg(short, long, default_value_t = 10.0)]
    duration: f64,

    /// Client threads (1 = a current-thread runtime).
    #[arg(short, long, default_value_t = 1)]
    threads: usize,

    /// ALPN protocols to offer, comma-separated ("" offers none).
    #[arg(long, default_value = "http/1.1")]
    alpn: String,

    /// SNI name sent in the ClientHello.
    #[arg(long, default_value = "localhost")]
    server_name: String,

    /// Make one connection, print what was negotiated, and exit.
    #[arg(long)]
    check: bool,
}

/// Where a connection failed.
#[derive(Debug)]
enum Failure {
    Connect(std::io::Error),
    Handshake(std::io::Error),
    Request(String),
    Timeout(&'static str),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Connect(e) => write!(f, "connect: {e}"),
            Failure::Handshake(e) => write!(f, "handshake: {e}"),
            Failure::Request(e) => write!(f, "request: {e}"),
            Failure::Timeout(what) => write!(f, "{what}: no answer within {IO_TIMEOUT:?}"),
        }
    }
}

/// Accepts any certificate chain but checks the handshake signature, so
/// the server's private-key operation still happens and is verified.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The parts of an `https://host:port/path` URL the client needs.
struct Target {
    addr: String,
    host_header: String,
    path: String,
}

fn parse_url(url: &str) -> Result<Target, String> {
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| format!("{url}: expected https://HOST:PORT/PATH"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if !authority.contains(':') {
        return Err(format!("{url}: the port is missing"));
    }
    Ok(Target {
        addr: authority.to_owned(),
        host_header: authority.to_owned(),
        path: path.to_owned(),
    })
}

fn client_config(alpn: &str) -> Result<ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    // Every handshake a full one: resumption would measure something else.
    config.resumption = rustls::client::Resumption::disabled();
    config.alpn_protocols = alpn
        .split(',')
        .filter(|p| !p.is_empty())
        .map(|p| p.as_bytes().to_vec())
        .collect();
    Ok(config)
}

/// What one completed connection negotiated and answered.
struct Exchange {
    handshake: Duration,
    version: String,
    cipher: String,
    alpn: Option<String>,
    head: String,
    body: Vec<u8>,
}

async fn with_timeout<T, E>(
    what: &'static str,
    fut: impl std::future::Future<Output = Result<T, E>>,
) -> Result<Result<T, E>, Failure> {
    tokio::time::timeout(IO_TIMEOUT, fut)
        .await
        .map_err(|_| Failure::Timeout(what))
}

/// The status code and Content-Length of a response head, if it has them.
fn parse_head(head: &str) -> (Option<u16>, Option<usize>) {
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok());
    let length = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok());
    (status, length)
}

/// Reads one response (head, then a Content-Length body or up to the close).
async fn read_response(tls: &mut TlsStream<TcpStream>) -> Result<(String, Vec<u8>), String> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > MAX_RESPONSE {
            return Err("response head too large".into());
        }
        match tls.read(&mut chunk).await {
            Ok(0) => return Err(format!("closed after {} bytes of head", buf.len())),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(format!("read: {e}")),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut body = buf.split_off(head_end + 4);
    let (_, length) = parse_head(&head);
    loop {
        if length.is_some_and(|n| body.len() >= n) || body.len() > MAX_RESPONSE {
            break;
        }
        match tls.read(&mut chunk).await {
            Ok(0) => break,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
            // A server that closes without close_notify after a complete
            // response has still answered.
            Err(_) if length.is_none() => break,
            Err(e) => return Err(format!("read body: {e}")),
        }
    }
    if let Some(n) = length {
        if body.len() < n {
            return Err(format!("body of {} bytes, Content-Length {n}", body.len()));
        }
        body.truncate(n);
    }
    Ok((head, body))
}

async fn one_connection(
    connector: &TlsConnector,
    name: &ServerName<'static>,
    target: &Target,
) -> Result<Exchange, Failure> {
    let start = Instant::now();
    let tcp = with_timeout("connect", TcpStream::connect(&target.addr))
        .await?
        .map_err(Failure::Connect)?;
    let _ = tcp.set_nodelay(true);
    let mut tls = with_timeout("handshake", connector.connect(name.clone(), tcp))
        .await?
        .map_err(Failure::Handshake)?;
    let handshake = start.elapsed();

    let (_, session) = tls.get_ref();
    let version = session
        .protocol_version()
        .map_or_else(|| "?".into(), |v| format!("{v:?}"));
    let cipher = session
        .negotiated_cipher_suite()
        .map_or_else(|| "?".into(), |c| format!("{:?}", c.suite()));
    let alpn = session
        .alpn_protocol()
        .map(|p| String::from_utf8_lossy(p).into_owned());

    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        target.path, target.host_header
    );
    with_timeout("request", tls.write_all(request.as_bytes()))
        .await?
        .map_err(|e| Failure::Request(format!("write: {e}")))?;
    let (head, body) = with_timeout("response", read_response(&mut tls))
        .await?
        .map_err(Failure::Request)?;
    // The server closes (Connection: close), so the TIME_WAIT stays on its
    // side and the client's ephemeral ports are not used up; wait for that.
    let mut rest = [0u8; 256];
    let _ = tokio::time::timeout(IO_TIMEOUT, async {
        while let Ok(n) = tls.read(&mut rest).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    Ok(Exchange {
        handshake,
        version,
        cipher,
        alpn,
        head,
        body,
    })
}

/// What one task did during the timed run.
#[derive(Default)]
struct TaskStats {
    handshakes: u64,
    requests: u64,
    /// Handshake times in nanoseconds.
    times: Vec<u64>,
    errors: u64,
    first_error: Option<String>,
}

async fn run_task(
    connector: TlsConnector,
    name: ServerName<'static>,
    target: Arc<Target>,
    deadline: Instant,
) -> TaskStats {
    let mut st = TaskStats {
        times: Vec::with_capacity(1 << 14),
        ..TaskStats::default()
    };
    while Instant::now() < deadline {
        match one_connection(&connector, &name, &target).await {
            Ok(ex) => {
                // A handshake that ends after the deadline is outside the
                // measured window.
                if Instant::now() <= deadline {
                    st.handshakes += 1;
                    st.times.push(ex.handshake.as_nanos() as u64);
                }
                if parse_head(&ex.head).0 == Some(200) {
                    st.requests += 1;
                } else {
                    st.errors += 1;
                    st.first_error
                        .get_or_insert_with(|| format!("response: {}", first_line(&ex.head)));
                }
            }
            Err(e) => {
                st.errors += 1;
                st.first_error.get_or_insert_with(|| e.to_string());
                // A refused connection fails at once: do not spin on it.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    st
}

fn first_line(head: &str) -> &str {
    head.lines().next().unwrap_or("")
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

async fn bench(args: &Args, connector: TlsConnector, name: ServerName<'static>) -> bool {
    let target = match parse_url(&args.url) {
        Ok(t) => Arc::new(t),
        Err(e) => {
            eprintln!("tls-load: {e}");
            return false;
        }
    };
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(args.duration);
    let handles: Vec<_> = (0..args.concurrency)
        .map(|_| {
            tokio::spawn(run_task(
                connector.clone(),
                name.clone(),
                target.clone(),
                deadline,
            ))
        })
        .collect();
    let mut all = Vec::with_capacity(handles.len());
    for h in handles {
        match h.await {
            Ok(st) => all.push(st),
            Err(e) => {
                eprintln!("tls-load: task failed: {e}");
                return false;
            }
        }
    }
    let handshakes: u64 = all.iter().map(|s| s.handshakes).sum();
    let requests: u64 = all.iter().map(|s| s.requests).sum();
    let errors: u64 = all.iter().map(|s| s.errors).sum();
    let mut times: Vec<u64> = all.iter_mut().flat_map(|s| s.times.drain(..)).collect();
    times.sort_unstable();

    println!(
        "tls-load: {}, {} concurrent, {} thread(s), {:.2} s, ALPN [{}]",
        args.url, args.concurrency, args.threads, args.duration, args.alpn
    );
    println!("Handshakes:      {handshakes}");
    println!("Handshakes/sec:  {:.2}", handshakes as f64 / args.duration);
    println!("Requests:        {requests}");
    println!(
        "Handshake p50:   {:.3} ms",
        ms(common::percentile(&times, 50.0))
    );
    println!(
        "Handshake p99:   {:.3} ms",
        ms(common::percentile(&times, 99.0))
    );
    println!("Errors:          {errors}");
    for e in all.iter().filter_map(|s| s.first_error.as_deref()).take(5) {
        println!("  error: {e}");
    }
    errors == 0
}

async fn check(args: &Args, connector: TlsConnector, name: ServerName<'static>) -> bool {
    let target = match parse_url(&args.url) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("tls-load: {e}");
            return false;
        }
    };
    match one_connection(&connector, &name, &target).await {
        Ok(ex) => {
            let status = parse_head(&ex.head).0;
            println!(
                "tls-load --check: {} {} ALPN {}, handshake {:.3} ms",
                ex.version,
                ex.cipher,
                ex.alpn.as_deref().unwrap_or("(none)"),
                ms(ex.handshake.as_nanos() as u64)
            );
            println!(
                "tls-load --check: {} ({} byte body: {:?})",
                first_line(&ex.head),
                ex.body.len(),
                String::from_utf8_lossy(&ex.body[..ex.body.len().min(64)])
            );
            status == Some(200)
        }
        Err(e) => {
            println!("tls-load --check: {e}");
            false
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.concurrency == 0 || args.threads == 0 || args.duration <= 0.0 {
        eprintln!("tls-load: --concurrency, --threads and --duration must be positive");
        return ExitCode::from(2);
    }
    let config = match client_config(&args.alpn) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tls-load: {e}");
            return ExitCode::from(2);
        }
    };
    let name = match ServerName::try_from(args.server_name.clone()) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("tls-load: --server-name {}: {e}", args.server_name);
            return ExitCode::from(2);
        }
    };
    let connector = TlsConnector::from(Arc::new(config));
    let rt = match common::runtime(args.threads) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the tokio runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let ok = rt.block_on(async {
        if args.check {
            check(&args, connector, name).await
        } else {
            bench(&args, connector, name).await
        }
    });
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_gives_address_host_and_path() {
        let t = parse_url("https://127.0.0.1:5443/hello?x=1").unwrap();
        assert_eq!(t.addr, "127.0.0.1:5443");
        assert_eq!(t.host_header, "127.0.0.1:5443");
        assert_eq!(t.path, "/hello?x=1");
        assert_eq!(parse_url("https://localhost:1").unwrap().path, "/");
    }

    #[test]
    fn url_without_https_or_port_is_refused() {
        assert!(parse_url("http://127.0.0.1:5443/").is_err());
        assert!(parse_url("https://127.0.0.1/").is_err());
    }

    #[test]
    fn head_gives_status_and_content_length_in_any_case() {
        let head = "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nContent-Length:  13 ";
        assert_eq!(parse_head(head), (Some(200), Some(13)));
        assert_eq!(parse_head("HTTP/1.1 404 Not Found"), (Some(404), None));
        assert_eq!(parse_head("garbage"), (None, None));
    }

    #[test]
    fn alpn_list_is_split_on_commas_and_may_be_empty() {
        let config = client_config("h2,http/1.1").unwrap();
        assert_eq!(
            config.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        assert!(client_config("").unwrap().alpn_protocols.is_empty());
    }
}
