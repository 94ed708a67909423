//! Certificates made at test time with rcgen: a CA, server certificates, client certificates
//! (good, expired, revoked through a CRL, with any subject), written as PEM files; and rustls
//! clients that use them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, CertificateRevocationListParams, CertifiedIssuer,
    DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevocationReason, RevokedCertParams, SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// A certificate authority and the folder its files go to.
pub struct Pki {
    pub dir: PathBuf,
    name: String,
    ca: CertifiedIssuer<'static, KeyPair>,
    next_serial: u64,
}

/// A certificate and key written as `<name>.pem` and `<name>.key`.
#[derive(Clone)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub serial: u64,
}

impl Issued {
    pub fn der(&self) -> CertificateDer<'static> {
        CertificateDer::from_pem_file(&self.cert).unwrap()
    }
}

impl Pki {
    /// A new CA named `name`, its certificate written to `<dir>/<name>-ca.pem`.
    pub fn new(dir: &Path, name: &str) -> Self {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, format!("{name} test CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let pki = Self { dir: dir.to_owned(), name: name.to_owned(), ca, next_serial: 100 };
        std::fs::write(pki.ca_file(), pki.ca.pem()).unwrap();
        pki
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.join(format!("{}-ca.pem", self.name))
    }

    pub fn ca_der(&self) -> CertificateDer<'static> {
        self.ca.der().clone()
    }

    /// A server certificate for `localhost` and 127.0.0.1, with common name `cn`.
    pub fn server(&mut self, file: &str, cn: &str) -> Issued {
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(file, params)
    }

    /// A client certificate whose subject is `subject` (common name first, if any) and with
    /// `sans` as subjectAltName.
    pub fn client_with(&mut self, file: &str, subject: DistinguishedName, sans: Vec<SanType>) -> Issued {
        let mut params = CertificateParams::default();
        params.distinguished_name = subject;
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(file, params)
    }

    /// A client certificate with common name `cn`.
    pub fn client(&mut self, file: &str, cn: &str) -> Issued {
        let mut subject = DistinguishedName::new();
        subject.push(DnType::CommonName, cn);
        self.client_with(file, subject, Vec::new())
    }

    /// A client certificate with common name `cn` that expired in 2001.
    pub fn expired_client(&mut self, file: &str, cn: &str) -> Issued {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = date_time_ymd(2000, 1, 1);
        params.not_after = date_time_ymd(2001, 1, 1);
        self.issue(file, params)
    }

    fn issue(&mut self, file: &str, mut params: CertificateParams) -> Issued {
        let serial = self.next_serial;
        self.next_serial += 1;
        params.serial_number = Some(SerialNumber::from(serial));
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let issued = Issued {
            cert: self.dir.join(format!("{file}.pem")),
            key: self.dir.join(format!("{file}.key")),
            serial,
        };
        std::fs::write(&issued.cert, cert.pem()).unwrap();
        std::fs::write(&issued.key, key.serialize_pem()).unwrap();
        issued
    }

    /// A CRL revoking `revoked`, written to `<file>.crl.pem`.
    pub fn crl(&self, file: &str, revoked: &[&Issued]) -> PathBuf {
        let params = CertificateRevocationListParams {
            this_update: date_time_ymd(2024, 1, 1),
            next_update: date_time_ymd(2099, 1, 1),
            crl_number: SerialNumber::from(1),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|issued| RevokedCertParams {
                    serial_number: SerialNumber::from(issued.serial),
                    revocation_time: date_time_ymd(2024, 1, 1),
                    reason_code: Some(RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&self.ca).unwrap();
        let path = self.dir.join(format!("{file}.crl.pem"));
        std::fs::write(&path, crl.pem().unwrap()).unwrap();
        path
    }
}

/// How a test client talks TLS.
pub struct Client {
    pub config: rustls::ClientConfig,
}

impl Client {
    /// Trusts `ca`; presents `identity` when given; TLS 1.2 and 1.3 (or only `versions`).
    pub fn new(
        ca: &CertificateDer<'static>,
        identity: Option<&Issued>,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Self {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots);
        let config = match identity {
            None => builder.with_no_client_auth(),
            Some(issued) => {
                let certs = vec![CertificateDer::from_pem_file(&issued.cert).unwrap()];
                let key = PrivateKeyDer::from_pem_file(&issued.key).unwrap();
                builder.with_client_auth_cert(certs, key).unwrap()
            }
        };
        Self { config }
    }

    pub fn trusting(ca: &CertificateDer<'static>, identity: Option<&Issued>) -> Self {
        Self::new(ca, identity, rustls::ALL_VERSIONS)
    }

    /// Connects and completes the handshake (as far as the client sees it: with TLS 1.3 a
    /// refused client certificate shows on the first read).
    pub async fn connect(&self, addr: SocketAddr) -> std::io::Result<TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let connector = TlsConnector::from(Arc::new(self.config.clone()));
        connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await
    }
}
