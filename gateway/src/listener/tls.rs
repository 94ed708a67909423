//! TLS on the device and ops listeners (rustls): the server configuration read from files and
//! swapped on reload, the handshake under its deadline in the connection's own task, the device
//! identity of a client certificate, and a TLS session as a [`ByteStream`].

use std::future::Future;
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ServerConnection, VerifierBuilderError, WebPkiClientVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore, ServerConfig,
    SignatureScheme,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use x509_cert::der::asn1::ObjectIdentifier;
use x509_cert::der::{Decode, Tag, Tagged};
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::SubjectAltName;

use super::ByteStream;
use crate::config::{ClientAuth, IdentitySource, TlsConfig, TlsVersion};
use crate::metrics::{Metrics, ProtocolLabel, ProtocolReasonLabel, ResultLabel};

/// Plaintext taken per `try_read_buf`: one TLS record's worth.
const MAX_READ: usize = 16 * 1024;

/// id-at-commonName.
const COMMON_NAME: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.3");
/// id-ce-subjectAltName.
const SUBJECT_ALT_NAME: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.17");

/// A TLS file or setting that cannot work, named by its config field.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct TlsSetupError {
    /// The `tls` field at fault (`cert_file`, `crl_files`, ...).
    pub field: &'static str,
    pub reason: String,
}

fn setup_error(field: &'static str, reason: impl Into<String>) -> TlsSetupError {
    TlsSetupError { field, reason: reason.into() }
}

/// Reads the files `settings` names and builds the rustls server configuration from them.
pub fn server_config(settings: &TlsConfig) -> Result<Arc<ServerConfig>, TlsSetupError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = read_certs(&settings.cert_file).map_err(|reason| setup_error("cert_file", reason))?;
    let key = PrivateKeyDer::from_pem_file(&settings.key_file).map_err(|error| {
        setup_error("key_file", format!("{}: no usable private key: {error}", settings.key_file.display()))
    })?;
    let versions: &[&rustls::SupportedProtocolVersion] = match settings.min_version {
        TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(versions)
        .map_err(|error| setup_error("min_version", error.to_string()))?;
    let builder = match &settings.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(ca_file) => {
            let mut roots = RootCertStore::empty();
            for ca in read_certs(ca_file).map_err(|reason| setup_error("client_ca_file", reason))? {
                roots.add(ca).map_err(|error| {
                    setup_error("client_ca_file", format!("{}: {error}", ca_file.display()))
                })?;
            }
            let mut crls = Vec::new();
            for file in &settings.crl_files {
                crls.extend(read_crls(file).map_err(|reason| setup_error("crl_files", reason))?);
            }
            let mut verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).with_crls(crls);
            if settings.client_auth == Some(ClientAuth::Optional) {
                verifier = verifier.allow_unauthenticated();
            }
            let inner = verifier.build().map_err(|error| match error {
                VerifierBuilderError::InvalidCrl(error) => {
                    setup_error("crl_files", format!("a CRL is not valid: {error:?}"))
                }
                other => setup_error("client_ca_file", other.to_string()),
            })?;
            let source = settings.identity.unwrap_or_default();
            builder.with_client_cert_verifier(Arc::new(IdentityVerifier { inner, source }))
        }
    };
    let config = builder.with_single_cert(certs, key).map_err(|error| {
        setup_error("key_file", format!("does not go with the certificate in cert_file: {error}"))
    })?;
    Ok(Arc::new(config))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let shown = path.display();
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|error| format!("{shown}: {error}"))?;
    if certs.is_empty() {
        return Err(format!("{shown}: no PEM CERTIFICATE in it"));
    }
    Ok(certs)
}

/// A CRL file is PEM (one or more `X509 CRL` sections) or a single DER CRL.
fn read_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, String> {
    let shown = path.display();
    let bytes = std::fs::read(path).map_err(|error| format!("{shown}: {error}"))?;
    if !bytes.starts_with(b"-----") {
        return Ok(vec![CertificateRevocationListDer::from(bytes)]);
    }
    let crls = CertificateRevocationListDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| format!("{shown}: {error}"))?;
    if crls.is_empty() {
        return Err(format!("{shown}: no PEM X509 CRL in it"));
    }
    Ok(crls)
}

/// Why a verified client certificate still names no acceptable device.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("the client certificate cannot be parsed: {0}")]
    Unparsable(String),
    #[error("the client certificate has no {0}")]
    Missing(&'static str),
    #[error("the client certificate has {count} values of {what}: the device identity must be unambiguous")]
    Ambiguous { what: &'static str, count: usize },
    #[error("the client certificate's {0} is not a text string weir reads (UTF8String, PrintableString, IA5String)")]
    NotText(&'static str),
    #[error("identity {value:?} from the client certificate is refused: {reason}")]
    Refused { value: String, reason: String },
}

impl IdentitySource {
    fn describe(self) -> &'static str {
        match self {
            IdentitySource::Cn => "subject common name (CN)",
            IdentitySource::SanDns => "DNS name in subjectAltName",
            IdentitySource::SanUri => "URI in subjectAltName",
            IdentitySource::SanEmail => "email address in subjectAltName",
        }
    }
}

/// The device identity `source` names in a (DER) certificate: exactly one value, which must be
/// a valid device id (not empty, no MQTT wildcard `+` or `#`, no control character).
pub fn certificate_identity(cert: &[u8], source: IdentitySource) -> Result<Arc<str>, IdentityError> {
    let cert =
        x509_cert::Certificate::from_der(cert).map_err(|e| IdentityError::Unparsable(e.to_string()))?;
    let tbs = &cert.tbs_certificate;
    let what = source.describe();
    let mut values = Vec::new();
    match source {
        IdentitySource::Cn => {
            for attribute in tbs.subject.0.iter().flat_map(|rdn| rdn.0.iter()) {
                if attribute.oid != COMMON_NAME {
                    continue;
                }
                let value = &attribute.value;
                if !matches!(value.tag(), Tag::Utf8String | Tag::PrintableString | Tag::Ia5String) {
                    return Err(IdentityError::NotText(what));
                }
                let text = std::str::from_utf8(value.value()).map_err(|_| IdentityError::NotText(what))?;
                values.push(text.to_owned());
            }
        }
        IdentitySource::SanDns | IdentitySource::SanUri | IdentitySource::SanEmail => {
            let extensions = tbs.extensions.as_deref().unwrap_or_default();
            for extension in extensions.iter().filter(|e| e.extn_id == SUBJECT_ALT_NAME) {
                let names = SubjectAltName::from_der(extension.extn_value.as_bytes())
                    .map_err(|e| IdentityError::Unparsable(e.to_string()))?;
                for name in names.0 {
                    match (source, name) {
                        (IdentitySource::SanDns, GeneralName::DnsName(n))
                        | (IdentitySource::SanUri, GeneralName::UniformResourceIdentifier(n))
                        | (IdentitySource::SanEmail, GeneralName::Rfc822Name(n)) => {
                            values.push(n.as_str().to_owned())
                        }
                        _ => {}
                    }
                }
            }
        }
    }
    let value = match values.len() {
        0 => return Err(IdentityError::Missing(what)),
        1 => values.remove(0),
        count => return Err(IdentityError::Ambiguous { what, count }),
    };
    if let Err(error) = weir_protocols::framing::check_device_id(&value) {
        return Err(IdentityError::Refused { value, reason: error.to_string() });
    }
    Ok(value.into())
}

/// webpki's client certificate verification, then the identity check: a certificate naming no
/// acceptable device fails the handshake (the client gets a `bad_certificate` alert) instead of
/// connecting and being dropped later.
#[derive(Debug)]
struct IdentityVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    source: IdentitySource,
}

impl ClientCertVerifier for IdentityVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        certificate_identity(end_entity, self.source).map_err(|error| {
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(error))))
        })?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The TLS side of one listener: its settings, the configuration new handshakes use (replaced
/// by [`TlsServer::reload`]), and its metrics.
pub struct TlsServer {
    settings: TlsConfig,
    /// Metric label of the listener (`mqtt`, `ws`, `tcp`, `ops`).
    label: &'static str,
    metrics: Arc<Metrics>,
    /// Each handshake takes a clone (an `Arc`), so a reload never touches open sessions.
    acceptor: RwLock<TlsAcceptor>,
}

/// A finished handshake.
pub struct Handshaken {
    /// Boxed: a TLS session is kilobytes, and the connection futures that carry it stay small.
    pub stream: Box<TlsStream<TcpStream>>,
    /// The device identity of the client certificate (mutual TLS), if the client sent one.
    pub identity: Option<Arc<str>>,
}

impl TlsServer {
    /// Reads the certificate files; fails as `weir check` would.
    pub fn new(
        settings: &TlsConfig,
        label: &'static str,
        metrics: Arc<Metrics>,
    ) -> Result<Self, TlsSetupError> {
        let acceptor = RwLock::new(TlsAcceptor::from(server_config(settings)?));
        Ok(Self { settings: settings.clone(), label, metrics, acceptor })
    }

    pub fn label(&self) -> &'static str {
        self.label
    }

    /// Re-reads the certificate, key, client CAs and CRLs: new handshakes use them, connections
    /// already open are untouched. On failure the previous configuration stays in use.
    pub fn reload(&self) -> Result<(), TlsSetupError> {
        let result = server_config(&self.settings);
        let outcome = if result.is_ok() { "ok" } else { "error" };
        self.metrics.tls_reloads.get_or_create(&ResultLabel { result: outcome }).inc();
        match result {
            Ok(config) => {
                *self.acceptor.write().unwrap_or_else(PoisonError::into_inner) = TlsAcceptor::from(config);
                tracing::info!(listener = self.label, "TLS certificates reloaded");
                Ok(())
            }
            Err(error) => {
                tracing::error!(listener = self.label, %error, "TLS reload failed; the previous certificates stay in use");
                Err(error)
            }
        }
    }

    /// Runs the handshake on an accepted connection, within the handshake deadline. `None`
    /// (counted by reason, the socket closed) when it fails or times out.
    pub async fn handshake(&self, stream: TcpStream) -> Option<Handshaken> {
        let acceptor = self.acceptor.read().unwrap_or_else(PoisonError::into_inner).clone();
        let deadline = Duration::from_millis(self.settings.handshake_timeout_ms);
        let reason = match tokio::time::timeout(deadline, acceptor.accept(stream)).await {
            Ok(Ok(stream)) => return self.finish(Box::new(stream)),
            Ok(Err(error)) => {
                let reason = failure_reason(&error);
                tracing::debug!(%error, reason, "TLS handshake failed");
                reason
            }
            Err(_) => {
                tracing::debug!("TLS handshake not finished within the deadline; closing");
                "timeout"
            }
        };
        self.count_failure(reason);
        None
    }

    /// [`TlsServer::handshake`], abandoned (the socket closed) when `shutdown` completes first.
    pub async fn handshake_until(
        &self,
        stream: TcpStream,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Option<Handshaken> {
        tokio::select! {
            handshaken = self.handshake(stream) => handshaken,
            () = shutdown => None,
        }
    }

    fn finish(&self, stream: Box<TlsStream<TcpStream>>) -> Option<Handshaken> {
        let identity = match (&self.settings.client_ca_file, stream.get_ref().1.peer_certificates()) {
            (Some(_), Some([leaf, ..])) => {
                // The verifier accepted it, so this only fails if the two disagree.
                match certificate_identity(leaf, self.settings.identity.unwrap_or_default()) {
                    Ok(identity) => Some(identity),
                    Err(error) => {
                        tracing::debug!(%error, "TLS client identity refused");
                        self.count_failure("bad_identity");
                        return None;
                    }
                }
            }
            _ => None,
        };
        if let Some(identity) = &identity {
            tracing::Span::current().record("device", &**identity);
        }
        self.metrics.tls_handshakes.get_or_create(&ProtocolLabel { protocol: self.label }).inc();
        Some(Handshaken { stream, identity })
    }

    fn count_failure(&self, reason: &'static str) {
        self.metrics
            .tls_handshake_failures
            .get_or_create(&ProtocolReasonLabel { protocol: self.label, reason })
            .inc();
    }
}

/// The label of `weir_tls_handshake_failures_total` for a failed handshake.
fn failure_reason(error: &io::Error) -> &'static str {
    let Some(tls) = error.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) else {
        return "io_error";
    };
    match tls {
        rustls::Error::NoCertificatesPresented => "no_client_certificate",
        rustls::Error::InvalidCertificate(error) => match error {
            CertificateError::Revoked => "certificate_revoked",
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "certificate_expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "certificate_not_yet_valid"
            }
            CertificateError::UnknownIssuer => "unknown_issuer",
            CertificateError::Other(OtherError(other)) if other.is::<IdentityError>() => "bad_identity",
            _ => "bad_certificate",
        },
        // No common protocol version (TLS 1.1 and older, or 1.2 under min_version = "1.3"),
        // cipher suite or signature scheme.
        rustls::Error::PeerIncompatible(_) => "incompatible",
        // The client refused weir's certificate (or gave up).
        rustls::Error::AlertReceived(_) => "client_alert",
        _ => "protocol_error",
    }
}

/// A TLS session as a device byte stream (MQTT, raw TCP). Input is decrypted into rustls' own
/// buffer and taken from there, so nothing here holds a buffer while the device is silent.
pub struct TlsByteStream {
    tls: Box<TlsStream<TcpStream>>,
    /// The TCP stream ended.
    eof: bool,
}

impl TlsByteStream {
    pub fn new(tls: Box<TlsStream<TcpStream>>) -> Self {
        Self { tls, eof: false }
    }

    /// Ready when decrypted input, the end of the stream, or an error is there to take.
    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let (tcp, session) = self.tls.get_mut();
        loop {
            let state = match session.process_new_packets() {
                Ok(state) => state,
                Err(error) => {
                    // Tell the peer why (the alert rustls queued), if the socket takes it now.
                    let _ = write_pending(tcp, session);
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, error)));
                }
            };
            // What rustls must send on its own (an answer to a key update) goes out now if it
            // can; otherwise with the next write.
            write_pending(tcp, session)?;
            if state.plaintext_bytes_to_read() > 0 || state.peer_has_closed() || self.eof {
                return Poll::Ready(Ok(()));
            }
            ready!(tcp.poll_read_ready(cx))?;
            match session.read_tls(&mut NonBlocking(tcp)) {
                Ok(0) => self.eof = true,
                Ok(_) => {}
                // The readiness was stale and is cleared: the next turn waits for the socket.
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => return Poll::Ready(Err(error)),
            }
        }
    }
}

/// Writes what rustls has queued for the peer, as far as the socket takes it without waiting.
fn write_pending(tcp: &TcpStream, session: &mut ServerConnection) -> io::Result<()> {
    while session.wants_write() {
        match session.write_tls(&mut NonBlocking(tcp)) {
            Ok(_) => {}
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

/// A TCP stream's non-blocking reads and writes as `std::io`, for rustls' `read_tls`/`write_tls`.
struct NonBlocking<'a>(&'a TcpStream);

impl Read for NonBlocking<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

impl Write for NonBlocking<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ByteStream for TlsByteStream {
    fn readable(&mut self) -> impl std::future::Future<Output = io::Result<()>> + Send {
        std::future::poll_fn(|cx| self.poll_readable(cx))
    }

    fn try_read_buf(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        let (_, session) = self.tls.get_mut();
        let start = buf.len();
        // The spare room is zeroed to be read into: at most what one TLS record holds, however
        // much the caller reserved (more stays in rustls, and `readable` is ready at once).
        buf.resize(buf.capacity().clamp(start + 1, start + MAX_READ), 0);
        match session.reader().read(&mut buf[start..]) {
            Ok(n) => {
                buf.truncate(start + n);
                Ok(n)
            }
            Err(error) => {
                buf.truncate(start);
                match error.kind() {
                    // The TCP stream ended without a close_notify: as for plain TCP, the device
                    // closed (MQTT and the frame formats delimit their own messages).
                    io::ErrorKind::UnexpectedEof => Ok(0),
                    _ => Err(error),
                }
            }
        }
    }

    async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        AsyncWriteExt::write_all(&mut *self.tls, bytes).await?;
        AsyncWriteExt::flush(&mut *self.tls).await
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        // Sends close_notify, then closes the TCP write side.
        AsyncWriteExt::shutdown(&mut *self.tls).await
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, DistinguishedName, DnType, DnValue, KeyPair, SanType};

    use super::*;

    fn cert(subject: &[(DnType, DnValue)], sans: Vec<SanType>) -> Vec<u8> {
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        for (kind, value) in subject {
            name.push(kind.clone(), value.clone());
        }
        params.distinguished_name = name;
        params.subject_alt_names = sans;
        params.self_signed(&KeyPair::generate().unwrap()).unwrap().der().to_vec()
    }

    fn utf8(text: &str) -> DnValue {
        DnValue::Utf8String(text.into())
    }

    #[test]
    fn the_identity_comes_from_the_chosen_field() {
        let der = cert(
            &[(DnType::OrganizationName, utf8("plant 7")), (DnType::CommonName, utf8("sensor-1"))],
            vec![
                SanType::DnsName("sensor-1.devices.example".try_into().unwrap()),
                SanType::URI("urn:dev:sensor-1".try_into().unwrap()),
                SanType::Rfc822Name("sensor-1@devices.example".try_into().unwrap()),
            ],
        );
        let id = |source| certificate_identity(&der, source).map(|id| id.to_string());
        assert_eq!(id(IdentitySource::Cn).unwrap(), "sensor-1");
        assert_eq!(id(IdentitySource::SanDns).unwrap(), "sensor-1.devices.example");
        assert_eq!(id(IdentitySource::SanUri).unwrap(), "urn:dev:sensor-1");
        assert_eq!(id(IdentitySource::SanEmail).unwrap(), "sensor-1@devices.example");
        let printable =
            cert(&[(DnType::CommonName, DnValue::PrintableString("meter 9".try_into().unwrap()))], vec![]);
        assert_eq!(&*certificate_identity(&printable, IdentitySource::Cn).unwrap(), "meter 9");
    }

    #[test]
    fn missing_ambiguous_and_wildcard_identities_are_refused() {
        let no_cn = cert(&[(DnType::OrganizationName, utf8("plant 7"))], vec![]);
        let err = certificate_identity(&no_cn, IdentitySource::Cn).unwrap_err();
        assert!(matches!(err, IdentityError::Missing(_)), "{err}");
        let err = certificate_identity(&no_cn, IdentitySource::SanDns).unwrap_err();
        assert!(matches!(err, IdentityError::Missing(_)), "{err}");

        let two = cert(
            &[],
            vec![SanType::DnsName("a.x".try_into().unwrap()), SanType::DnsName("b.x".try_into().unwrap())],
        );
        let err = certificate_identity(&two, IdentitySource::SanDns).unwrap_err();
        assert!(matches!(err, IdentityError::Ambiguous { count: 2, .. }), "{err}");

        for bad in ["dev+1", "plant/#", "", "tab\there", "nul\0"] {
            let der = cert(&[(DnType::CommonName, utf8(bad))], vec![]);
            let err = certificate_identity(&der, IdentitySource::Cn).unwrap_err();
            assert!(matches!(err, IdentityError::Refused { .. }), "{bad:?}: {err}");
        }
        let bmp = cert(&[(DnType::CommonName, DnValue::BmpString("x".try_into().unwrap()))], vec![]);
        let err = certificate_identity(&bmp, IdentitySource::Cn).unwrap_err();
        assert!(matches!(err, IdentityError::NotText(_)), "{err}");
        let err = certificate_identity(b"not a certificate", IdentitySource::Cn).unwrap_err();
        assert!(matches!(err, IdentityError::Unparsable(_)), "{err}");
    }
}
