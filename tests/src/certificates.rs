//! Certificates and keys for a test control plane: a CA, the API server's serving
//! certificate for 127.0.0.1, an admin client certificate in `system:masters`, and the
//! service-account signing key; a CA with a loopback serving certificate for any other TLS
//! server a test runs; and one for named hosts a test stands in for. Pure: returns PEM or DER,
//! writes nothing.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

use crate::error::FixtureResult;

/// The user name of the admin client certificate.
pub const ADMIN_USER: &str = "fleet-access-test-admin";
/// The group of the admin client certificate (bypasses RBAC).
pub const ADMIN_GROUP: &str = "system:masters";

/// PEM-encoded certificates and keys for one control plane.
#[derive(Debug, Clone)]
pub struct ControlPlaneCertificates {
    /// The CA that signed the serving and client certificates.
    pub ca_cert_pem: String,
    /// The API server's serving certificate (127.0.0.1, ::1, localhost).
    pub serving_cert_pem: String,
    /// The serving certificate's private key.
    pub serving_key_pem: String,
    /// The admin client certificate (CN [`ADMIN_USER`], O [`ADMIN_GROUP`]).
    pub admin_cert_pem: String,
    /// The admin client certificate's private key.
    pub admin_key_pem: String,
    /// The service-account token signing key (private).
    pub service_account_key_pem: String,
    /// The service-account token verification key (public).
    pub service_account_public_key_pem: String,
}

/// A fresh test CA and a serving certificate it signed for the loopback addresses: for any TLS
/// server a test runs (the SSM emulator's `wss://` gateway).
#[derive(Debug, Clone)]
pub struct LoopbackTls {
    /// The CA (trust it, for example through `SSL_CERT_FILE`).
    pub ca_cert_pem: String,
    /// The serving certificate (127.0.0.1, ::1, localhost).
    pub cert_pem: String,
    /// Its private key.
    pub key_pem: String,
}

impl LoopbackTls {
    /// Generates a CA and a serving certificate named `common_name` (ECDSA P-256 keys).
    pub fn generate(common_name: &str) -> FixtureResult<Self> {
        let ca = test_ca()?;
        let (cert_pem, key_pem) = loopback_serving(&ca, common_name)?;
        Ok(Self {
            ca_cert_pem: ca.pem(),
            cert_pem,
            key_pem,
        })
    }
}

/// A fresh test CA and a serving certificate it signed for DNS `names`, as DER for a server
/// in-process: for a test's stand-in of a named service (see `service_proxy`).
#[derive(Debug, Clone)]
pub struct NamedTls {
    /// The CA (PEM).
    pub ca_cert_pem: String,
    /// The serving certificate (DER).
    pub cert_der: Vec<u8>,
    /// Its private key (PKCS#8 DER).
    pub key_der: Vec<u8>,
}

impl NamedTls {
    /// Generates a CA and a serving certificate for `names` (ECDSA P-256 keys).
    pub fn generate(names: &[&str]) -> FixtureResult<Self> {
        let ca = test_ca()?;
        let mut params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())?;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &ca)?;
        Ok(Self {
            ca_cert_pem: ca.pem(),
            cert_der: cert.der().to_vec(),
            key_der: key.serialize_der(),
        })
    }
}

fn test_ca() -> FixtureResult<CertifiedIssuer<'static, KeyPair>> {
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "fleet-access test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(CertifiedIssuer::self_signed(
        ca_params,
        KeyPair::generate()?,
    )?)
}

/// A serving certificate and key (PEM) for 127.0.0.1, ::1 and localhost, signed by `ca`.
fn loopback_serving(
    ca: &CertifiedIssuer<'static, KeyPair>,
    common_name: &str,
) -> FixtureResult<(String, String)> {
    let mut serving_params = CertificateParams::new(vec!["localhost".to_owned()])?;
    serving_params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    serving_params.subject_alt_names.extend([
        SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        SanType::IpAddress(IpAddr::V6(Ipv6Addr::LOCALHOST)),
    ]);
    serving_params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    serving_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let serving_key = KeyPair::generate()?;
    let serving_cert = serving_params.signed_by(&serving_key, ca)?;
    Ok((serving_cert.pem(), serving_key.serialize_pem()))
}

impl ControlPlaneCertificates {
    /// Generates a fresh set (ECDSA P-256 keys).
    pub fn generate() -> FixtureResult<Self> {
        let ca = test_ca()?;
        let (serving_cert_pem, serving_key_pem) = loopback_serving(&ca, "kube-apiserver")?;

        let mut admin_params = CertificateParams::new(Vec::<String>::new())?;
        admin_params
            .distinguished_name
            .push(DnType::CommonName, ADMIN_USER);
        admin_params
            .distinguished_name
            .push(DnType::OrganizationName, ADMIN_GROUP);
        admin_params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        admin_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let admin_key = KeyPair::generate()?;
        let admin_cert = admin_params.signed_by(&admin_key, &ca)?;

        let service_account_key = KeyPair::generate()?;

        Ok(Self {
            ca_cert_pem: ca.pem(),
            serving_cert_pem,
            serving_key_pem,
            admin_cert_pem: admin_cert.pem(),
            admin_key_pem: admin_key.serialize_pem(),
            service_account_key_pem: service_account_key.serialize_pem(),
            service_account_public_key_pem: service_account_key.public_key_pem(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_distinct_pem_certificates_and_keys() {
        let set = ControlPlaneCertificates::generate().expect("generates");
        for cert in [&set.ca_cert_pem, &set.serving_cert_pem, &set.admin_cert_pem] {
            assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"), "{cert}");
        }
        for key in [
            &set.serving_key_pem,
            &set.admin_key_pem,
            &set.service_account_key_pem,
        ] {
            assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"), "{key}");
        }
        assert!(
            set.service_account_public_key_pem
                .starts_with("-----BEGIN PUBLIC KEY-----")
        );
        assert_ne!(set.serving_key_pem, set.admin_key_pem);
        assert_ne!(set.serving_cert_pem, set.admin_cert_pem);
    }

    #[test]
    fn a_loopback_serving_certificate_comes_with_its_own_ca() {
        let first = LoopbackTls::generate("gateway").expect("generates");
        let second = LoopbackTls::generate("gateway").expect("generates");
        assert!(first.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(first.key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        assert_ne!(first.ca_cert_pem, second.ca_cert_pem);
        assert_ne!(first.cert_pem, first.ca_cert_pem);
    }

    #[test]
    fn two_sets_share_nothing() {
        let first = ControlPlaneCertificates::generate().expect("generates");
        let second = ControlPlaneCertificates::generate().expect("generates");
        assert_ne!(first.ca_cert_pem, second.ca_cert_pem);
        assert_ne!(
            first.service_account_key_pem,
            second.service_account_key_pem
        );
    }
}
