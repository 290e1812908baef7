//! TLS: the server configuration the `--ssl-*` options describe, the
//! handshake each connection makes in its own task, and the facts a
//! finished handshake leaves for the scope's `tls` extension
//! (PAGI::Spec::Tls).
//!
//! Everything that can be wrong with the files is found by [`Settings::load`]
//! at startup, before the listener is bound; a connection can then only fail
//! its own handshake, which costs the server nothing but a debug line.
//! HUP reads the files again ([`Reloadable::reload`]): a renewed certificate
//! is taken up by the connections that follow, and one that cannot be used
//! leaves the configuration in force as it was.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use clap::ValueEnum;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ServerConnection, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// ALPN names (RFC 7301).
pub const ALPN_HTTP1: &[u8] = b"http/1.1";
pub const ALPN_H2: &[u8] = b"h2";

/// What a TLS server offers in ALPN, in order of preference: h2 first, as
/// browsers and load balancers expect, and HTTP/1.1 for the rest.
pub const OFFERED_PROTOCOLS: &[&[u8]] = &[ALPN_H2, ALPN_HTTP1];

/// The handshake bound when `--timeout` is 0.  That turns off the deadline
/// for request heads, but a handshake stays bounded: until it finishes, no
/// request can exist on the connection, so waiting longer serves no one.
pub const HANDSHAKE_TIMEOUT_WHEN_UNSET: Duration = Duration::from_secs(60);

/// `--ssl-verify-client`: whether a client certificate is asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum VerifyClient {
    /// No certificate is asked for.
    Off,
    /// A client may present a certificate; one that does not verify against
    /// --ssl-ca-file fails the handshake, none at all is fine.
    Optional,
    /// A client must present a certificate that verifies.
    Required,
}

/// `--ssl-min-version`: the oldest TLS version accepted (a floor: the
/// newest both sides support is used).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum MinTlsVersion {
    #[value(name = "1.2", alias = "TLSv1_2")]
    Tls12,
    #[value(name = "1.3", alias = "TLSv1_3")]
    Tls13,
}

/// Why TLS cannot be set up; each names the option, the file and the problem.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{option} {}: cannot read the file: {source}", path.display())]
    Unreadable {
        option: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{option} {}: not valid PEM: {detail}", path.display())]
    BadPem {
        option: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("{option} {}: no PEM certificate (BEGIN CERTIFICATE) in the file", path.display())]
    NoCertificate { option: &'static str, path: PathBuf },
    #[error("--ssl-key {}: no PEM private key (PKCS#8, PKCS#1 or SEC1) in the file", path.display())]
    NoKey { path: PathBuf },
    #[error("--ssl-key {}: the private key cannot be used: {detail}", path.display())]
    BadKey { path: PathBuf, detail: String },
    #[error("--ssl-cert {}: the certificate cannot be used: {detail}", path.display())]
    BadCertificate { path: PathBuf, detail: String },
    #[error(
        "--ssl-key {} does not match the certificate in --ssl-cert {}",
        key.display(),
        cert.display()
    )]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("--ssl-ca-file {}: {detail}", path.display())]
    BadCa { path: PathBuf, detail: String },
    /// rustls refused a setting it was built to accept (the protocol
    /// versions of its own provider).
    #[error("cannot set up TLS: {0}")]
    Setup(rustls::Error),
    /// Options that do not go together.
    #[error("{0}")]
    Options(&'static str),
}

/// The `--ssl-*` options, checked for consistency but not yet read.
#[derive(Clone, Debug)]
pub struct Settings {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
    pub verify_client: VerifyClient,
    pub min_version: MinTlsVersion,
}

impl Settings {
    /// The TLS settings the options ask for: None for cleartext, an error
    /// for options that do not go together.
    pub fn from_options(
        cert: Option<&Path>,
        key: Option<&Path>,
        client_ca: Option<&Path>,
        verify_client: Option<VerifyClient>,
        min_version: Option<MinTlsVersion>,
    ) -> Result<Option<Settings>, TlsError> {
        let (cert, key) = match (cert, key) {
            (Some(c), Some(k)) => (c, k),
            (Some(_), None) => {
                return Err(TlsError::Options(
                    "--ssl-cert needs --ssl-key (the certificate's private key)",
                ))
            }
            (None, Some(_)) => {
                return Err(TlsError::Options(
                    "--ssl-key needs --ssl-cert (the certificate it belongs to)",
                ))
            }
            (None, None) => {
                if client_ca.is_some() || verify_client.is_some() || min_version.is_some() {
                    return Err(TlsError::Options(
                        "--ssl-ca-file, --ssl-verify-client and --ssl-min-version need TLS: \
                         give --ssl-cert and --ssl-key",
                    ));
                }
                return Ok(None);
            }
        };
        let verify_client = verify_client.unwrap_or(VerifyClient::Off);
        match (verify_client, client_ca) {
            (VerifyClient::Off, Some(_)) => {
                return Err(TlsError::Options(
                    "--ssl-ca-file is used only to verify client certificates: \
                     give --ssl-verify-client optional or required",
                ))
            }
            (VerifyClient::Optional | VerifyClient::Required, None) => {
                return Err(TlsError::Options(
                    "--ssl-verify-client optional or required needs --ssl-ca-file \
                     (the CA certificates that sign client certificates)",
                ))
            }
            _ => {}
        }
        Ok(Some(Settings {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            client_ca: client_ca.map(Path::to_path_buf),
            verify_client,
            min_version: min_version.unwrap_or(MinTlsVersion::Tls12),
        }))
    }

    /// Read the files and build what every connection shares, offering
    /// `alpn` (most preferred first) in the handshake.
    pub fn load(&self, alpn: &[&[u8]], handshake_timeout: Duration) -> Result<Tls, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = read_certificates("--ssl-cert", &self.cert)?;
        let key = read_key(&self.key)?;
        let signing_key =
            provider
                .key_provider
                .load_private_key(key)
                .map_err(|e| TlsError::BadKey {
                    path: self.key.clone(),
                    detail: e.to_string(),
                })?;
        let certified = CertifiedKey::new(chain, signing_key);
        match certified.keys_match() {
            Ok(()) => {}
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
                return Err(TlsError::KeyMismatch {
                    cert: self.cert.clone(),
                    key: self.key.clone(),
                })
            }
            // The key cannot say what its public half is: the handshake
            // itself will show whether they belong together.
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
            Err(e) => {
                return Err(TlsError::BadCertificate {
                    path: self.cert.clone(),
                    detail: e.to_string(),
                })
            }
        }
        let (server_cert, certificate) = match certified.end_entity_cert() {
            Ok(leaf) => (pem_certificate(leaf), describe_certificate(leaf)),
            Err(e) => {
                return Err(TlsError::BadCertificate {
                    path: self.cert.clone(),
                    detail: e.to_string(),
                })
            }
        };
        let versions: &[&rustls::SupportedProtocolVersion] = match self.min_version {
            MinTlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
            MinTlsVersion::Tls13 => &[&rustls::version::TLS13],
        };
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .map_err(TlsError::Setup)?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => builder.with_client_cert_verifier(self.client_verifier(ca, provider)?),
        };
        let mut config =
            builder.with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified)));
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Tls {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            server_cert: server_cert.into(),
            certificate,
            handshake_timeout,
        })
    }

    fn client_verifier(
        &self,
        ca: &Path,
        provider: Arc<CryptoProvider>,
    ) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
        let bad_ca = |detail: String| TlsError::BadCa {
            path: ca.to_path_buf(),
            detail,
        };
        let mut roots = RootCertStore::empty();
        for cert in read_certificates("--ssl-ca-file", ca)? {
            roots
                .add(cert)
                .map_err(|e| bad_ca(format!("not a usable CA certificate: {e}")))?;
        }
        let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
        let builder = match self.verify_client {
            // Only a client that presents nothing gets through unverified:
            // a certificate that does not verify fails the handshake, as
            // with the reference server's verify_client (OpenSSL's
            // SSL_VERIFY_PEER).  The tls extension's client_cert_error is
            // therefore always undef.
            VerifyClient::Optional => builder.allow_unauthenticated(),
            _ => builder,
        };
        builder.build().map_err(|e| bad_ca(e.to_string()))
    }
}

/// The file's bytes, or an error naming the option, the file and the OS error.
fn read_file(option: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Unreadable {
        option,
        path: path.to_path_buf(),
        source,
    })
}

fn read_certificates(
    option: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(option, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadPem {
            option,
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            option,
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// The first private key in the file, in any of the three PEM forms.
fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read_file("--ssl-key", path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey {
            path: path.to_path_buf(),
        },
        other => TlsError::BadPem {
            option: "--ssl-key",
            path: path.to_path_buf(),
            detail: other.to_string(),
        },
    })
}

/// A certificate as PEM text, as the tls extension carries it.
pub fn pem_certificate(der: &[u8]) -> String {
    let body = data_encoding::BASE64.encode(der);
    let mut pem = String::with_capacity(body.len() + body.len() / 64 + 64);
    pem.push_str("-----BEGIN CERTIFICATE-----\n");
    for line in body.as_bytes().chunks(64) {
        // Base64 output is ASCII.
        pem.push_str(std::str::from_utf8(line).unwrap_or_default());
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

/// A certificate in a few words for the log: its subject and when it
/// expires, which is what an operator checks after a renewal.
fn describe_certificate(der: &[u8]) -> String {
    use x509_cert::der::Decode;
    match x509_cert::Certificate::from_der(der) {
        Ok(cert) => format!(
            "{}, valid until {}",
            cert.tbs_certificate.subject, cert.tbs_certificate.validity.not_after
        ),
        Err(_) => "a certificate whose fields do not parse".to_string(),
    }
}

/// The subject of a DER certificate as an RFC 4514 string.
pub fn subject_name(der: &[u8]) -> Option<String> {
    use x509_cert::der::Decode;
    let cert = x509_cert::Certificate::from_der(der).ok()?;
    Some(cert.tbs_certificate.subject.to_string())
}

/// What every TLS connection shares: the acceptor and the facts that do not
/// change from one connection to the next.
pub struct Tls {
    acceptor: TlsAcceptor,
    /// The server's own certificate (the leaf), as PEM.
    server_cert: Arc<str>,
    /// The leaf's subject and expiry, for log lines.
    certificate: String,
    handshake_timeout: Duration,
}

/// The TLS configuration in force, with the settings it was loaded from so
/// that the files can be read again.  Each connection takes the one in
/// force when it is accepted and keeps it to its end; a reload changes only
/// the connections that follow.  A process that forks takes the one in
/// force into the child: a master that reloads on HUP starts its new
/// workers with the renewed certificate.
pub struct Reloadable {
    settings: Settings,
    alpn: &'static [&'static [u8]],
    handshake_timeout: Duration,
    current: RwLock<Arc<Tls>>,
}

impl Reloadable {
    /// Read the files for the first time; the errors are [`Settings::load`]'s.
    pub fn load(
        settings: Settings,
        alpn: &'static [&'static [u8]],
        handshake_timeout: Duration,
    ) -> Result<Reloadable, TlsError> {
        let tls = settings.load(alpn, handshake_timeout)?;
        Ok(Reloadable {
            settings,
            alpn,
            handshake_timeout,
            current: RwLock::new(Arc::new(tls)),
        })
    }

    /// The configuration a connection accepted now uses.
    pub fn current(&self) -> Arc<Tls> {
        // Nothing panics while the lock is held (a clone, a swap), so a
        // poisoned lock still holds a whole configuration.
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Read the certificate, key and CA files again and put what they hold
    /// in force.  Whatever is wrong with them is found before anything
    /// changes: on an error the configuration in force stays, so a renewal
    /// gone wrong never leaves the server without a certificate.
    pub fn reload(&self) -> Result<Arc<Tls>, TlsError> {
        let fresh = Arc::new(self.settings.load(self.alpn, self.handshake_timeout)?);
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = fresh.clone();
        Ok(fresh)
    }
}

/// Why a handshake did not finish.  Reported at debug level only.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("TLS handshake not finished within {}s", .0.as_secs())]
    TimedOut(Duration),
    #[error("TLS handshake failed: {0}")]
    Failed(#[from] io::Error),
}

impl Tls {
    /// The certificate served, in a few words: its subject and expiry.
    pub fn certificate(&self) -> &str {
        &self.certificate
    }

    /// Run the server side of the handshake on `io`, bounded in time.  Call
    /// it from the connection's own task: a slow or silent client holds
    /// only its own task, and only for the bound.
    pub async fn accept<IO>(&self, io: IO) -> Result<(TlsStream<IO>, Arc<TlsFacts>), HandshakeError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let stream = tokio::time::timeout(self.handshake_timeout, self.acceptor.accept(io))
            .await
            .map_err(|_| HandshakeError::TimedOut(self.handshake_timeout))??;
        let facts = TlsFacts::of(stream.get_ref().1, &self.server_cert);
        Ok((stream, Arc::new(facts)))
    }
}

/// The application protocol a handshake settled on (ALPN).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppProtocol {
    Http1,
    Http2,
}

/// Which protocol to speak on an accepted stream: what ALPN chose, HTTP/1.1
/// when the client offered no ALPN (it chose nothing else).
pub fn negotiated_protocol<IO>(stream: &TlsStream<IO>) -> AppProtocol {
    protocol_of(stream.get_ref().1.alpn_protocol())
}

fn protocol_of(alpn: Option<&[u8]>) -> AppProtocol {
    match alpn {
        Some(p) if p == ALPN_H2 => AppProtocol::Http2,
        _ => AppProtocol::Http1,
    }
}

/// One connection's TLS facts, computed once after its handshake; the
/// `tls` extension of every scope on the connection (PAGI::Spec::Tls).
/// `client_cert_error` is not here: it is always undef (see
/// `Settings::client_verifier`).
pub struct TlsFacts {
    /// The server's certificate, PEM.
    pub server_cert: Arc<str>,
    /// The certificates the client presented, PEM, leaf first; verified
    /// against `--ssl-ca-file` during the handshake.
    pub client_cert_chain: Vec<String>,
    /// The leaf's subject, RFC 4514.
    pub client_cert_name: Option<String>,
    /// `0x0303` for TLS 1.2, `0x0304` for TLS 1.3.
    pub tls_version: Option<u16>,
    /// The IANA cipher-suite number, e.g. `0x1301`.
    pub cipher_suite: Option<u16>,
}

impl TlsFacts {
    fn of(conn: &ServerConnection, server_cert: &Arc<str>) -> TlsFacts {
        let presented = conn.peer_certificates().unwrap_or_default();
        TlsFacts {
            server_cert: server_cert.clone(),
            client_cert_chain: presented.iter().map(|c| pem_certificate(c)).collect(),
            client_cert_name: presented.first().and_then(|leaf| subject_name(leaf)),
            tls_version: conn.protocol_version().map(u16::from),
            cipher_suite: conn.negotiated_cipher_suite().map(|s| u16::from(s.suite())),
        }
    }
}

impl fmt::Debug for TlsFacts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsFacts")
            .field("client_cert_name", &self.client_cert_name)
            .field("client_certs", &self.client_cert_chain.len())
            .field("tls_version", &self.tls_version)
            .field("cipher_suite", &self.cipher_suite)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_file(name: &str, contents: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pagi-rs-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    fn settings(
        cert: bool,
        key: bool,
        ca: bool,
        verify: Option<VerifyClient>,
        min: Option<MinTlsVersion>,
    ) -> Result<Option<Settings>, TlsError> {
        Settings::from_options(
            cert.then_some(Path::new("c.pem")),
            key.then_some(Path::new("k.pem")),
            ca.then_some(Path::new("ca.pem")),
            verify,
            min,
        )
    }

    #[test]
    fn options_that_do_not_go_together_are_refused() {
        assert!(settings(false, false, false, None, None).unwrap().is_none());
        for (cert, key, ca, verify, min, says) in [
            (true, false, false, None, None, "--ssl-cert needs --ssl-key"),
            (false, true, false, None, None, "--ssl-key needs --ssl-cert"),
            (false, false, true, None, None, "need TLS"),
            (
                false,
                false,
                false,
                Some(VerifyClient::Off),
                None,
                "need TLS",
            ),
            (
                false,
                false,
                false,
                None,
                Some(MinTlsVersion::Tls13),
                "need TLS",
            ),
            (true, true, true, None, None, "--ssl-ca-file is used only"),
            (
                true,
                true,
                false,
                Some(VerifyClient::Required),
                None,
                "needs --ssl-ca-file",
            ),
            (
                true,
                true,
                false,
                Some(VerifyClient::Optional),
                None,
                "needs --ssl-ca-file",
            ),
        ] {
            let err = settings(cert, key, ca, verify, min)
                .unwrap_err()
                .to_string();
            assert!(err.contains(says), "{err}");
        }
    }

    #[test]
    fn defaults_are_no_client_certificates_and_tls_1_2() {
        let s = settings(true, true, false, None, None).unwrap().unwrap();
        assert_eq!(s.verify_client, VerifyClient::Off);
        assert_eq!(s.min_version, MinTlsVersion::Tls12);
        assert!(s.client_ca.is_none());
        let s = settings(true, true, true, Some(VerifyClient::Optional), None)
            .unwrap()
            .unwrap();
        assert_eq!(s.client_ca.as_deref(), Some(Path::new("ca.pem")));
    }

    #[test]
    fn file_problems_name_the_option_and_the_file() {
        let missing = Path::new("/nonexistent/pagi-rs-cert.pem");
        let err = read_certificates("--ssl-cert", missing).unwrap_err();
        assert!(matches!(err, TlsError::Unreadable { .. }));
        let text = err.to_string();
        assert!(
            text.starts_with("--ssl-cert /nonexistent/pagi-rs-cert.pem: cannot read"),
            "{text}"
        );

        let empty = temp_file("empty.pem", b"nothing here\n");
        let err = read_certificates("--ssl-ca-file", &empty).unwrap_err();
        assert!(
            matches!(
                err,
                TlsError::NoCertificate {
                    option: "--ssl-ca-file",
                    ..
                }
            ),
            "{err}"
        );
        assert!(matches!(read_key(&empty), Err(TlsError::NoKey { .. })));

        let broken = temp_file("broken.pem", b"-----BEGIN CERTIFICATE-----\nAAAA\n");
        let err = read_certificates("--ssl-cert", &broken).unwrap_err();
        assert!(matches!(err, TlsError::BadPem { .. }), "{err}");
    }

    #[test]
    fn pem_certificates_read_back_as_the_same_der() {
        let der: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let pem = pem_certificate(&der);
        assert!(pem.lines().all(|l| l.len() <= 64), "{pem}");
        let back = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        assert_eq!(back.as_ref(), &der[..]);
        let path = temp_file("two.pem", format!("{pem}{pem}").as_bytes());
        assert_eq!(read_certificates("--ssl-cert", &path).unwrap().len(), 2);
    }

    #[test]
    fn alpn_names_the_protocol_and_none_is_http1() {
        assert_eq!(protocol_of(None), AppProtocol::Http1);
        assert_eq!(protocol_of(Some(ALPN_HTTP1)), AppProtocol::Http1);
        assert_eq!(protocol_of(Some(ALPN_H2)), AppProtocol::Http2);
        assert_eq!(OFFERED_PROTOCOLS, &[ALPN_H2, ALPN_HTTP1]);
    }

    #[test]
    fn a_subject_that_does_not_parse_is_no_name() {
        assert_eq!(subject_name(b"not a certificate"), None);
        assert_eq!(subject_name(&[]), None);
    }

    /// A self-signed certificate and its key for `CN=cn`, made by openssl
    /// (the prove tests need it too), in `dir` as `cn.pem` and `cn.key`.
    fn self_signed(dir: &Path, cn: &str) -> (PathBuf, PathBuf) {
        let (cert, key) = (dir.join(format!("{cn}.pem")), dir.join(format!("{cn}.key")));
        let made = std::process::Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
            .arg("-subj")
            .arg(format!("/CN={cn}"))
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("openssl runs");
        assert!(made.status.success(), "{made:?}");
        (cert, key)
    }

    /// `first` and `renewed` certificates, and `first` installed where the
    /// settings read them from, in a directory of the test's own.
    fn installed_first(test: &str) -> (PathBuf, Settings) {
        let dir = std::env::temp_dir().join(format!("pagi-rs-tls-{}-{test}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for cn in ["first", "renewed"] {
            self_signed(&dir, cn);
        }
        install(&dir, "first");
        let settings = Settings::from_options(
            Some(&dir.join("current.pem")),
            Some(&dir.join("current.key")),
            None,
            None,
            None,
        )
        .unwrap()
        .unwrap();
        (dir, settings)
    }

    fn install(dir: &Path, cn: &str) {
        for ext in ["pem", "key"] {
            std::fs::copy(
                dir.join(format!("{cn}.{ext}")),
                dir.join(format!("current.{ext}")),
            )
            .unwrap();
        }
    }

    #[test]
    fn a_reload_puts_the_renewed_certificate_in_force_for_what_follows() {
        let (dir, settings) = installed_first("renewed");
        let tls = Reloadable::load(settings, OFFERED_PROTOCOLS, Duration::from_secs(5)).unwrap();
        let before = tls.current();
        assert!(
            before.certificate().starts_with("CN=first, valid until "),
            "{}",
            before.certificate()
        );

        install(&dir, "renewed");
        let fresh = tls.reload().unwrap();
        assert!(
            fresh.certificate().starts_with("CN=renewed, "),
            "{}",
            fresh.certificate()
        );
        assert!(Arc::ptr_eq(&fresh, &tls.current()));
        assert!(tls.current().server_cert.contains("BEGIN CERTIFICATE"));
        assert_ne!(before.server_cert, tls.current().server_cert);
        // A connection accepted before keeps what it was accepted with.
        assert!(before.certificate().starts_with("CN=first, "));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_reload_that_cannot_be_used_leaves_the_certificate_in_force() {
        let (dir, settings) = installed_first("refused");
        let tls = Reloadable::load(settings, OFFERED_PROTOCOLS, Duration::from_secs(5)).unwrap();

        // A renewal half done: the new certificate beside the old key.
        std::fs::copy(dir.join("renewed.pem"), dir.join("current.pem")).unwrap();
        let Err(err) = tls.reload() else {
            panic!("a key that does not match was used")
        };
        assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err}");
        assert!(tls.current().certificate().starts_with("CN=first, "));

        std::fs::remove_file(dir.join("current.key")).unwrap();
        let Err(err) = tls.reload() else {
            panic!("a missing key was not noticed")
        };
        assert!(
            matches!(
                err,
                TlsError::Unreadable {
                    option: "--ssl-key",
                    ..
                }
            ),
            "{err}"
        );
        assert!(tls.current().certificate().starts_with("CN=first, "));

        install(&dir, "renewed");
        assert!(tls
            .reload()
            .unwrap()
            .certificate()
            .starts_with("CN=renewed, "));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_certificate_is_described_by_its_subject_and_expiry() {
        let dir =
            std::env::temp_dir().join(format!("pagi-rs-tls-{}-described", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, _) = self_signed(&dir, "described");
        let der = read_certificates("--ssl-cert", &cert).unwrap().remove(0);
        let text = describe_certificate(&der);
        // "valid until" is the notAfter time, two days from now (-days 2).
        let until = text.rsplit(' ').next().unwrap();
        assert!(text.starts_with("CN=described, valid until 20"), "{text}");
        assert!(until.ends_with('Z') && until.contains('T'), "{text}");
        assert_eq!(
            describe_certificate(b"junk"),
            "a certificate whose fields do not parse"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
