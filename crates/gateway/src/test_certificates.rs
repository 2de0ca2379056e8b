//! Certificates for the crate's own tests (made here with rcgen; no files are committed).

use std::path::Path;

use sitegate_model::config::TlsConfig;

/// A CA and a certificate for `site` from it, written into `dir`: the peer-link files of
/// a site whose peers trust that CA.
pub(crate) fn write(dir: &Path, site: &str) -> TlsConfig {
    write_sites(dir, &[site]).remove(0)
}

/// One CA and a certificate from it for each of `sites`: the peer-link files of a federation.
pub(crate) fn write_sites(dir: &Path, sites: &[&str]) -> Vec<TlsConfig> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose, SanType,
    };
    let mut ca = CertificateParams::default();
    ca.distinguished_name
        .push(DnType::CommonName, "router test CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let ca_path = dir.join("ca.pem");
    std::fs::write(&ca_path, ca_cert.pem()).unwrap();
    sites
        .iter()
        .map(|site| {
            let mut params = CertificateParams::default();
            params.distinguished_name.push(DnType::CommonName, *site);
            params.subject_alt_names = vec![SanType::DnsName((*site).try_into().unwrap())];
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let site_key = KeyPair::generate().unwrap();
            let site_cert = params.signed_by(&site_key, &issuer).unwrap();
            let tls = TlsConfig {
                ca: ca_path.clone(),
                cert: dir.join(format!("{site}.pem")),
                key: dir.join(format!("{site}.key")),
            };
            std::fs::write(&tls.cert, site_cert.pem()).unwrap();
            std::fs::write(&tls.key, site_key.serialize_pem()).unwrap();
            tls
        })
        .collect()
}
