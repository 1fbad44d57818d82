//! Certificates made at test time: a CA, server certificates it signs, client certificates for
//! mutual TLS, and the matching rustls client configurations.

use std::path::PathBuf;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType,
    SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};
use topgun_server::network::TlsConfig;

/// A certificate authority that can sign server and client certificates.
pub struct TestCa {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// A signed certificate and its private key, in PEM.
#[derive(Clone)]
pub struct Issued {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Its private key, PEM.
    pub key_pem: String,
}

impl Issued {
    /// The certificate, DER.
    pub fn der(&self) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).expect("certificate PEM")
    }

    fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).expect("key PEM")
    }
}

impl TestCa {
    /// A new self-signed CA called `name`.
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).expect("CA certificate");
        Self { cert, key }
    }

    /// The CA's certificate, PEM.
    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A certificate for `localhost` and 127.0.0.1 with the given serial number.
    pub fn server_cert(&self, serial: u64) -> Issued {
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
        params.subject_alt_names.push(SanType::IpAddress([127, 0, 0, 1].into()));
        params.serial_number = Some(SerialNumber::from(serial));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params)
    }

    /// A client certificate for mutual TLS.
    pub fn client_cert(&self, name: &str) -> Issued {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params)
    }

    fn issue(&self, params: CertificateParams) -> Issued {
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.cert, &self.key).expect("signed certificate");
        Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() }
    }

    /// Trust anchors holding just this CA.
    pub fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots.add(CertificateDer::from(self.cert.der().to_vec())).expect("CA root");
        roots
    }

    /// A client configuration that trusts this CA, speaks HTTP/1.1 over TLS 1.2 or 1.3, and
    /// presents `identity` when given.
    pub fn client_config(&self, identity: Option<&Issued>) -> Arc<ClientConfig> {
        Arc::new(self.client_config_for(rustls::DEFAULT_VERSIONS, &[b"http/1.1"], identity))
    }

    /// A client configuration with explicit protocol versions and ALPN protocols.
    pub fn client_config_for(
        &self,
        versions: &[&'static rustls::SupportedProtocolVersion],
        alpn: &[&[u8]],
        identity: Option<&Issued>,
    ) -> ClientConfig {
        let builder =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(versions)
                .expect("protocol versions")
                .with_root_certificates(self.roots());
        let mut config = match identity {
            Some(id) => builder
                .with_client_auth_cert(vec![id.der()], id.key_der())
                .expect("client identity"),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config
    }
}

/// PEM files on disk for a server, in a temporary folder removed on drop.
pub struct TlsFiles {
    /// The folder holding the files; removed when dropped.
    pub dir: tempfile::TempDir,
    /// Where the server finds them.
    pub config: TlsConfig,
}

impl TlsFiles {
    /// Writes `server`'s certificate and key (and `client_ca`'s certificate, for mutual TLS).
    pub fn write(server: &Issued, client_ca: Option<&TestCa>) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = |name: &str| -> PathBuf { dir.path().join(name) };
        std::fs::write(path("server.pem"), &server.cert_pem).expect("write cert");
        std::fs::write(path("server.key"), &server.key_pem).expect("write key");
        let ca_cert_path = client_ca.map(|ca| {
            std::fs::write(path("client-ca.pem"), ca.pem()).expect("write CA");
            path("client-ca.pem")
        });
        let config =
            TlsConfig { cert_path: path("server.pem"), key_path: path("server.key"), ca_cert_path };
        Self { dir, config }
    }

    /// Overwrites the certificate and key files in place, as a certificate renewal would.
    pub fn replace(&self, server: &Issued) {
        std::fs::write(&self.config.cert_path, &server.cert_pem).expect("rewrite cert");
        std::fs::write(&self.config.key_path, &server.key_pem).expect("rewrite key");
    }
}
