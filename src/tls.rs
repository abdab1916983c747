//! TLS: the local CA that intercepted connections are signed by, per-host leaf certificates,
//! and the client configuration for upstream TLS.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore};
use time::OffsetDateTime;

/// How long a new local CA is valid by default: short, so a leaked CA key ages out.
pub(crate) const DEFAULT_CA_DAYS: u32 = 90;
/// Validity of issued leaf certificates; they are cached for half of it.
pub(crate) const LEAF_VALIDITY: Duration = Duration::from_secs(24 * 3600);

/// Errors in TLS set-up.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(pub String);

fn err(m: impl Into<String>) -> TlsError {
    TlsError(m.into())
}

/// Create a local CA (ECDSA P-256): `ca.pem` and `ca-key.pem` (mode 0600) in `dir`.
/// Refuses to overwrite an existing key unless `force`.
pub fn init_ca(dir: &Path, days: u32, force: bool) -> Result<(PathBuf, PathBuf), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir).map_err(|e| err(format!("{}: {e}", dir.display())))?;
    let cert_path = dir.join("ca.pem");
    let key_path = dir.join("ca-key.pem");
    if !force && key_path.exists() {
        return Err(err(format!(
            "{} exists; pass --force to replace the CA",
            key_path.display()
        )));
    }
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| err(e.to_string()))?;
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let mut dn = DistinguishedName::new();
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
    dn.push(DnType::CommonName, format!("Chaperone local CA {suffix}"));
    dn.push(DnType::OrganizationName, "Chaperone sidecar");
    params.distinguished_name = dn;
    let now = OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(i64::from(days));
    let cert = params.self_signed(&key).map_err(|e| err(e.to_string()))?;

    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true).mode(0o600);
    let mut f = opts
        .open(&key_path)
        .map_err(|e| err(format!("{}: {e}", key_path.display())))?;
    // Re-assert the mode: an existing file keeps its old permissions on open.
    std::fs::set_permissions(
        &key_path,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .map_err(|e| err(format!("{}: {e}", key_path.display())))?;
    f.write_all(key.serialize_pem().as_bytes())
        .map_err(|e| err(format!("{}: {e}", key_path.display())))?;
    std::fs::write(&cert_path, cert.pem())
        .map_err(|e| err(format!("{}: {e}", cert_path.display())))?;
    Ok((cert_path, key_path))
}

/// Issues and caches leaf certificates signed by the local CA.
///
/// Every leaf carries one key pair, made on the first issuance and held only in memory for
/// the process's life (as mitmproxy does). A key of its own per leaf would protect nothing
/// more: each would sit in the same memory as the CA key, which can sign a leaf for any name
/// anyway. Sharing it makes a new host cost one signature, not a key generation, a PKCS#8
/// round trip and a hop to the blocking pool: issuance is cheap enough to run on the worker
/// (BENCHMARKS.md, issue 21).
pub struct LeafIssuer {
    issuer: Issuer<'static, KeyPair>,
    ca_der: CertificateDer<'static>,
    /// Made on first use, so the start does not wait on aws-lc's entropy seeding.
    leaf_key: OnceLock<LeafKey>,
    cache: moka::future::Cache<String, Arc<CertifiedKey>>,
}

/// The leaves' key pair, for signing by rcgen and for rustls' handshakes.
struct LeafKey {
    pair: KeyPair,
    signing: Arc<dyn rustls::sign::SigningKey>,
}

impl std::fmt::Debug for LeafIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LeafIssuer([CA key redacted])")
    }
}

impl LeafIssuer {
    /// Load the CA from PEM files.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| err(format!("CA key: {e}")))?;
        let ca_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| err(format!("CA certificate: {e}")))?
            .into_owned();
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)
            .map_err(|e| err(format!("CA certificate: {e}")))?;
        Ok(LeafIssuer {
            issuer,
            ca_der,
            leaf_key: OnceLock::new(),
            cache: moka::future::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(LEAF_VALIDITY / 2)
                .build(),
        })
    }

    /// The certificate for `host` (DNS name or IP literal): from the cache, or issued now
    /// (one ECDSA signature, tens of microseconds). Concurrent misses for one host issue once.
    pub(crate) async fn get(&self, host: &str) -> Result<Arc<CertifiedKey>, TlsError> {
        self.cache
            .try_get_with_by_ref(host, async { self.issue(host) })
            .await
            .map_err(|e: Arc<TlsError>| err(e.to_string()))
    }

    fn leaf_key(&self) -> Result<&LeafKey, TlsError> {
        if let Some(k) = self.leaf_key.get() {
            return Ok(k);
        }
        let pair =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| err(e.to_string()))?;
        let der = PrivateKeyDer::from(PrivatePkcs8KeyDer::from(pair.serialize_der()));
        let signing = rustls::crypto::aws_lc_rs::sign::any_supported_type(&der)
            .map_err(|e| err(e.to_string()))?;
        // Two first issuances at once may both make one; the first kept is used by all.
        Ok(self.leaf_key.get_or_init(|| LeafKey { pair, signing }))
    }

    /// Issue a leaf now: one signature by the CA over a certificate for the shared leaf key.
    pub fn issue(&self, host: &str) -> Result<Arc<CertifiedKey>, TlsError> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![match host.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => {
                // rustls' own DNS-name rules (rcgen accepts any IA5 string).
                rustls::pki_types::DnsName::try_from(host)
                    .map_err(|_| err(format!("`{host}` is not a DNS name")))?;
                SanType::DnsName(
                    host.to_string()
                        .try_into()
                        .map_err(|_| err(format!("`{host}` is not a DNS name")))?,
                )
            }
        }];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, host);
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after =
            now + time::Duration::try_from(LEAF_VALIDITY).map_err(|e| err(e.to_string()))?;
        let key = self.leaf_key()?;
        let cert = params
            .signed_by(&key.pair, &self.issuer)
            .map_err(|e| err(e.to_string()))?;
        Ok(Arc::new(CertifiedKey::new(
            vec![cert.der().clone(), self.ca_der.clone()],
            key.signing.clone(),
        )))
    }
}

/// Which roots verify upstream certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum UpstreamRoots {
    /// The operating system's trust store.
    System,
    /// A PEM bundle.
    Bundle(PathBuf),
}

/// The operating system's trust store, read once per process. Reading it is ~150 files on
/// Debian (`rustls-native-certs` reads the bundle and then the hashed directory, which holds
/// the same certificates again) and parsing each: `prefetch_system_roots` begins it on its
/// own thread as `run` starts, beside the configuration and the policy compile, and
/// `client_config` then waits for that read instead of repeating it.
static SYSTEM_ROOTS: OnceLock<Result<RootCertStore, String>> = OnceLock::new();

fn system_roots() -> &'static Result<RootCertStore, String> {
    SYSTEM_ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        let mut store = RootCertStore::empty();
        let mut seen = std::collections::HashSet::new();
        for c in &found.certs {
            if seen.insert(c.as_ref()) {
                let _ = store.add(c.clone());
            }
        }
        if store.is_empty() {
            return Err(format!(
                "no system root certificates found ({}); set tls.upstream_roots to a PEM bundle",
                found
                    .errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ")
            ));
        }
        Ok(store)
    })
}

/// Begin reading the system trust store on another thread (see `SYSTEM_ROOTS`).
pub(crate) fn prefetch_system_roots() {
    std::thread::spawn(|| {
        let _ = system_roots();
    });
}

/// Client TLS for upstreams: hostname always verified against the roots; ALPN and session
/// resumption are set by the connector and rustls' defaults.
pub(crate) fn client_config(roots: &UpstreamRoots) -> Result<ClientConfig, TlsError> {
    let mut store = RootCertStore::empty();
    match roots {
        UpstreamRoots::System => {
            store = system_roots().clone().map_err(err)?;
        }
        UpstreamRoots::Bundle(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| err(format!("{}: {e}", path.display())))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| err(format!("{}: {e}", path.display())))?;
            if certs.is_empty() {
                return Err(err(format!(
                    "{}: no certificates in the bundle",
                    path.display()
                )));
            }
            for c in certs {
                store
                    .add(c)
                    .map_err(|e| err(format!("{}: {e}", path.display())))?;
            }
        }
    }
    Ok(ClientConfig::builder()
        .with_root_certificates(store)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_init_and_leaf_issuance() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = init_ca(dir.path(), 30, false).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(
            init_ca(dir.path(), 30, false).is_err(),
            "no silent overwrite"
        );
        let issuer = LeafIssuer::from_pem(
            &std::fs::read_to_string(&cert).unwrap(),
            &std::fs::read_to_string(&key).unwrap(),
        )
        .unwrap();
        let dns = issuer.issue("api.example.org").unwrap();
        assert_eq!(dns.cert.len(), 2, "leaf and CA");
        let ip = issuer.issue("127.0.0.1").unwrap();
        assert!(issuer.issue("bad host name!").is_err());
        // Each leaf is a certificate of its own, for the shared leaf key: the key the
        // handshake signs with is the one the certificate names.
        assert_ne!(dns.cert[0], ip.cert[0]);
        for leaf in [&dns, &ip] {
            let spki = leaf
                .key
                .public_key()
                .expect("an ECDSA key has a public key");
            let der = leaf.cert[0].as_ref();
            assert!(
                der.windows(spki.len()).any(|w| w == spki.as_ref()),
                "the certificate carries the signing key's public key"
            );
        }
    }
}
