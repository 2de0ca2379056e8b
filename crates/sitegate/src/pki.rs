//! Certificates of a federation: one CA, and per site a certificate whose DNS SAN is the site
//! name, usable both as the peer link's server certificate and as its client certificate.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

/// A certificate and its private key, PEM-encoded.
pub struct Pem {
    pub cert: String,
    pub key: String,
}

/// A CA able to issue site certificates.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    pub pem: Pem,
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = OffsetDateTime::now_utc();
    // A little back-dating tolerates clocks between sites that disagree by minutes.
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(days);
}

/// A CA name no other CA has: certificate chains are matched by issuer name first, and two
/// CAs of one name make a foreign certificate fail late and confusingly (a bad signature).
pub fn unique_ca_name() -> String {
    use rand::Rng;
    let suffix: u32 = rand::thread_rng().gen();
    format!("sitegate federation CA {suffix:08x}")
}

/// A new federation CA, valid for ten years.
pub fn new_authority(name: &str) -> Result<Authority, String> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn.push(DnType::OrganizationName, "sitegate federation");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut params, 3650);
    let key = KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    let pem = Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    };
    Ok(Authority {
        issuer: Issuer::new(params, key),
        pem,
    })
}

/// Loads a CA written by `new_authority` (or any CA certificate and key in PEM).
pub fn load_authority(cert_pem: &str, key_pem: &str) -> Result<Authority, String> {
    let key = KeyPair::from_pem(key_pem).map_err(|e| format!("CA key: {e}"))?;
    let issuer =
        Issuer::from_ca_cert_pem(cert_pem, key).map_err(|e| format!("CA certificate: {e}"))?;
    Ok(Authority {
        issuer,
        pem: Pem {
            cert: cert_pem.to_owned(),
            key: key_pem.to_owned(),
        },
    })
}

/// A site certificate signed by `ca`, valid for `days`.
pub fn issue_site_certificate(ca: &Authority, site: &str, days: i64) -> Result<Pem, String> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, site);
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::DnsName(
        site.try_into().map_err(|e: rcgen::Error| e.to_string())?,
    )];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    validity(&mut params, days);
    let key = KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = params
        .signed_by(&key, &ca.issuer)
        .map_err(|e| e.to_string())?;
    Ok(Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reloads_an_authority_and_issues_from_it() {
        let ca = new_authority("test CA").unwrap();
        let again = load_authority(&ca.pem.cert, &ca.pem.key).unwrap();
        assert!(issue_site_certificate(&again, "site2", 30).is_ok());
        assert!(load_authority("not pem", &ca.pem.key).is_err());
    }

    #[test]
    fn issues_pem_certificates() {
        let ca = new_authority("test CA").unwrap();
        assert!(ca.pem.cert.starts_with("-----BEGIN CERTIFICATE-----"));
        let site = issue_site_certificate(&ca, "site1", 365).unwrap();
        assert!(site.cert.contains("BEGIN CERTIFICATE"));
        assert!(site.key.contains("PRIVATE KEY"));
        assert_ne!(site.cert, ca.pem.cert);
    }
}
